"""tools/preprocess_data.py as a user runs it: exit codes, messages, files (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_sft.data.indexed import output_paths

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "preprocess_data.py"

GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."}]}


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)


def test_cli_skip_fail_and_bad_flags(tmp_path, tiny_tokenizer_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([json.dumps(GOOD), "{not json", json.dumps(GOOD)]) + "\n")
    prefix = tmp_path / "out" / "sft"
    common = ["--input", data, "--tokenizer", tiny_tokenizer_dir, "--output-prefix", prefix, "--seq-length", 128, "--no-progress"]

    failed = _run(*common)  # --on-error fail is the default
    assert failed.returncode == 1, failed.stderr
    assert f"error: {data}:2: invalid_json: " in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not any(os.path.exists(p) for p in output_paths(prefix))

    skipped = _run(*common, "--on-error", "skip", "--workers", 2)
    assert skipped.returncode == 0, skipped.stderr
    assert "records: 3 read, 3 used after mixing, 2 kept, 1 dropped, 0 truncated" in skipped.stdout
    assert f"dropped invalid_json: 1 (e.g. {data}:2:" in skipped.stdout
    assert all(os.path.exists(p) for p in output_paths(prefix))
    report = json.loads(Path(f"{prefix}.report.json").read_text())
    assert report["conversations"] == 2 and report["packs"] == 1 and report["workers"] == 2

    bad_flags = _run(*common, "--mixture-ratios", "1.0,2.0", "--workers", 0)
    assert bad_flags.returncode == 2
    assert "--mixture-ratios has 2 values for 1 inputs" in bad_flags.stderr and "--workers must be >= 1" in bad_flags.stderr

    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("seq_lenght: 64\n")
    bad_values = _run("--config", bad_config, *common, "--seq-length", "abc")  # flags win over files
    assert bad_values.returncode == 2 and "Traceback" not in bad_values.stderr
    assert f"{bad_config}: unknown key 'seq_lenght'" in bad_values.stderr
    assert "--seq-length: 'seq_length' = 'abc': expected int" in bad_values.stderr


def test_cli_output_and_tokenizer_errors_are_messages(tmp_path):
    """One run per message family of issue 8 class 6; each fails before loading anything heavy."""
    import contextlib

    from tests.fs_helpers import mounted_tmpfs

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    prefix = tmp_path / "out" / "sft"
    prefix.parent.mkdir()
    Path(f"{prefix}.meta.json").write_text("{}")
    common = ["--input", data, "--seq-length", 128, "--no-progress"]

    exists = _run(*common, "--tokenizer", tmp_path / "no_such_tokenizer", "--output-prefix", prefix)
    assert exists.returncode == 1 and "Traceback" not in exists.stderr
    assert f"error: --output-prefix {prefix} exists already ({prefix}.meta.json): pass --overwrite" in exists.stderr

    missing = _run(*common, "--tokenizer", tmp_path / "no_such_tokenizer", "--output-prefix", prefix, "--overwrite")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"error: --tokenizer {tmp_path / 'no_such_tokenizer'}: no such folder" in missing.stderr

    tokenizer = tmp_path / "tok"  # resolve_tokenizer only looks at the file names
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            folder, expected = stack.enter_context(mounted_tmpfs(tmp_path / "ro", "ro,size=64k")), "read-only file system at"
        else:
            folder, expected = tmp_path / "ro", "permission denied writing"
            folder.mkdir(mode=0o555)
            stack.callback(folder.chmod, 0o755)
        read_only = _run(*common, "--tokenizer", tokenizer, "--output-prefix", folder / "sft")
    assert read_only.returncode == 1 and "Traceback" not in read_only.stderr
    assert f"error: {expected} {folder}" in read_only.stderr and "folder you can write to" in read_only.stderr


def test_cli_never_imports_transformer_engine(tmp_path, tiny_tokenizer_dir):
    """Megatron-Core imports Transformer Engine when installed (seconds of CUDA libraries the
    compiler never uses); the CLI marks it absent. A TE that fails on import must not matter."""
    fake = tmp_path / "site" / "transformer_engine"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('transformer_engine was imported')\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(SCRIPT), "--input", str(data), "--tokenizer", str(tiny_tokenizer_dir),
           "--output-prefix", str(tmp_path / "out"), "--seq-length", "128", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "transformer_engine was imported" not in done.stderr
    # The fake TE is importable in that environment, so the test would catch an import.
    probe = subprocess.run([sys.executable, "-c", "import transformer_engine"], capture_output=True, text=True,
                           cwd=REPO_ROOT, timeout=60, env=env)
    assert "transformer_engine was imported" in probe.stderr
