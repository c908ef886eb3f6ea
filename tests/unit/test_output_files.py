"""Where the compiler writes: leftover staging folders, disk full, read-only output (issue 8, class 6).

The disk-full and read-only cases run on a real tiny tmpfs when this process may mount one (root in
a container that allows it); otherwise disk full is simulated by a write raising OSError(ENOSPC)
and read-only by chmod (skipped when chmod does not stop this user, i.e. root)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import subprocess

import pytest

from megatron_sft.data.compiler import CompileConfig, CompileError, compile_dataset
from megatron_sft.data.output_files import clean_stale_staging, make_staging_dir, write_error
from tests.fs_helpers import mounted_tmpfs

GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."}]}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(GOOD) for _ in range(20)) + "\n")
    return path


def _config(data, tokenizer_dir, prefix, **extra):
    return CompileConfig(inputs=[str(data)], tokenizer=str(tokenizer_dir), output_prefix=str(prefix), seq_length=128,
                         progress=False, **extra)


def test_stale_staging_of_a_dead_process_removed_others_reported(tmp_path, caplog):
    prefix = str(tmp_path / "sft")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".sft.tmp-{dead.pid}@{host}-abc123"
    running = tmp_path / f".sft.tmp-{os.getpid()}@{host}-def456"
    remote = tmp_path / f".sft.tmp-{dead.pid}@some-other-node-ghi789"
    old_format = tmp_path / ".sft.tmp-k2j4h5"
    other_prefix = tmp_path / f".sft2.tmp-{dead.pid}@{host}-abc123"
    for folder in (stale, running, remote, old_format, other_prefix):
        folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="megatron_sft"):
        assert clean_stale_staging(prefix) == [str(stale)]
    assert not stale.exists() and running.exists() and remote.exists() and old_format.exists() and other_prefix.exists()
    assert "removed 1 staging folder(s) of interrupted runs" in caplog.text
    assert "process still running" in caplog.text and "written on host some-other-node" in caplog.text
    assert "from an older version" in caplog.text and "remove them yourself" in caplog.text
    mine = make_staging_dir(prefix)
    assert os.path.basename(mine).startswith(f".sft.tmp-{os.getpid()}@{host}-")


def test_compile_removes_leftover_staging_of_an_interrupted_run(tmp_path, tiny_tokenizer_dir, data):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = out / f".sft.tmp-{dead.pid}@{socket.gethostname()}-zzz"
    leftover.mkdir()
    (leftover / "spill-1.tokens").write_bytes(b"\0" * 64)
    compile_dataset(_config(data, tiny_tokenizer_dir, out / "sft"))
    assert not leftover.exists() and not [p for p in os.listdir(out) if ".tmp-" in p]


def test_write_error_messages():
    message = str(write_error(OSError(errno.ENOSPC, "No space left on device"), "/data/out/sft"))
    assert message.startswith("no space left on /data/out while writing --output-prefix /data/out/sft")
    assert "free space there or choose an --output-prefix" in message
    message = str(write_error(PermissionError(errno.EACCES, "Permission denied", "/data/out/.sft.tmp-1"), "/data/out/sft"))
    assert message.startswith("permission denied writing /data/out/.sft.tmp-1") and "folder you can write to" in message
    assert write_error(OSError(errno.EIO, "I/O error"), "/data/out/sft") is None


def test_disk_full_simulated(tmp_path, tiny_tokenizer_dir, data, monkeypatch):
    from megatron_sft.data import indexed

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(indexed.PackedWriter, "add_pack", full)
    with pytest.raises(CompileError, match=f"^no space left on {tmp_path / 'out'} while writing --output-prefix"):
        compile_dataset(_config(data, tiny_tokenizer_dir, tmp_path / "out" / "sft"))
    assert os.listdir(tmp_path / "out") == []  # staging folder removed, nothing published


def test_disk_full_on_a_real_tiny_filesystem(tmp_path, tiny_tokenizer_dir, data):
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as mount:
        with contextlib.suppress(OSError), open(mount / "filler", "wb") as f:
            while True:  # leave no block free
                f.write(b"\0" * 4096)
                f.flush()
        with pytest.raises(CompileError, match=f"^no space left on {mount}.* while writing --output-prefix {mount / 'sft'}"):
            compile_dataset(_config(data, tiny_tokenizer_dir, mount / "sft"))
        assert os.listdir(mount) == ["filler"]


def test_read_only_output_folder(tmp_path, tiny_tokenizer_dir, data, monkeypatch):
    if os.geteuid() == 0:
        with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
            with pytest.raises(CompileError, match=f"^read-only file system at {mount}.*folder you can write to"):
                compile_dataset(_config(data, tiny_tokenizer_dir, mount / "sft"))
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("chmod does not stop this user from writing")
        with pytest.raises(CompileError, match=f"^permission denied writing {folder}.*folder you can write to"):
            compile_dataset(_config(data, tiny_tokenizer_dir, folder / "sft"))
    finally:
        folder.chmod(0o755)
