"""HF <-> Megatron conversion end to end, for every supported family (tiny random models).

* HF -> Megatron -> HF through the two CLIs: every tensor bit-equal (dtype kept), config
  equivalent, tokenizer + chat template identical, generation_config eos ids include the
  template's end-of-turn token, and ``AutoModelForCausalLM.from_pretrained`` loads the result.
* Logits: the converted checkpoint loaded into Megatron's GPTModel (torch backend, CPU, fp32) at
  TP=1 and TP=2 (torchrun, gloo) matches the HF model on packed THD input (three conversations,
  each compared to HF run on it alone) and on unpacked input.

Megatron runs in subprocesses (its CPU patches are process-global); this file is also the
torchrun worker (``--worker``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "def add(a, b):"},
     {"role": "assistant", "content": "return a + b"},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
    [{"role": "user", "content": "0123456789"}, {"role": "assistant", "content": "9876543210"}],
]
ATOL = 2e-5  # fp32 noise on logits of magnitude ~1


# ----------------------------------------------------------------------------------- worker


def _worker(root: Path, tp: int) -> None:
    """torchrun worker: load each converted checkpoint at TP=tp, write its logits' max errors."""
    sys.path.insert(0, str(REPO))
    import torch

    import megatron_sft.mcore  # noqa: F401
    from megatron.core import dist_checkpointing
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_sft.config import ParallelConfig
    from megatron_sft.conversion.convert import model_config_from_yaml
    from megatron_sft import runtime
    from megatron_sft.model import build

    runtime.initialize_distributed()
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    runtime.setup_model_parallel(parallel)
    rank = torch.distributed.get_rank()
    results = {}
    for family in FAMILIES:
        ckpt = root / family / "megatron"
        ref = torch.load(root / family / "hf_logits.pt")
        cfg = model_config_from_yaml(ckpt / "config.yaml")
        model = build.build_gpt_model(cfg, parallel, backend="torch").eval()
        sharded = build.canonical_sharded_state_dict(model, metadata={"non_homogeneous_layers": True})
        saved_keys = set(dist_checkpointing.load_tensors_metadata(str(ckpt)))
        assert saved_keys == {v.key for v in sharded.values()}, saved_keys ^ {v.key for v in sharded.values()}
        loaded = dist_checkpointing.load({"model": sharded}, str(ckpt))["model"]
        missing, unexpected = model.load_state_dict(loaded, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

        def logits(tokens, **kwargs):
            with torch.no_grad():
                out = model(input_ids=tokens, attention_mask=None, **kwargs)
            return gather_from_tensor_model_parallel_region(out)[0]  # [s, vocab]

        seqs = ref["tokens"]
        lengths = [len(s) for s in seqs]
        packed = torch.cat(seqs)[None]
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                              cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        thd = logits(packed, position_ids=positions, packed_seq_params=psp).split(lengths)
        errors = {"packed": [], "unpacked": []}
        for i, seq in enumerate(seqs):
            alone = logits(seq[None], position_ids=torch.arange(len(seq))[None])
            errors["packed"].append((thd[i] - ref["logits"][i]).abs().max().item())
            errors["unpacked"].append((alone - ref["logits"][i]).abs().max().item())
        results[family] = errors
        if tp == 2:  # a trainer-like save at TP=2, Megatron's default (stacked-layer) layout
            save = root / family / "tp2_save"
            it = save / "iter_0000007"
            if rank == 0:
                it.mkdir(parents=True)
            torch.distributed.barrier()
            dist_checkpointing.save({"model": build.canonical_sharded_state_dict(model)}, str(it))
            torch.distributed.barrier()
            if rank == 0:
                (it / "config.yaml").write_text((ckpt / "config.yaml").read_text()
                                                + f"checkpoint:\n  pretrained: {ckpt}\n")
                (save / "latest_checkpointed_iteration.txt").write_text("7\n")
    if rank == 0:
        (root / f"megatron_errors_tp{tp}.json").write_text(json.dumps(results, indent=2))
    runtime.teardown_model_parallel()


def _pipeline_worker(root: Path) -> None:
    """torchrun worker at PP=2: each stage loads its layers (global layer numbers) and, for tied
    embeddings, the output layer; every loaded parameter must equal the HF tensor it came from."""
    sys.path.insert(0, str(REPO))
    import torch

    import megatron_sft.mcore  # noqa: F401
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_sft.config import ParallelConfig
    from megatron_sft.conversion.common import architecture_for, convert_hf_to_megatron
    from megatron_sft.conversion.convert import model_config_from_yaml
    from megatron_sft.conversion.hf_io import SafetensorsReader
    from megatron_sft import runtime
    from megatron_sft.model import build

    runtime.initialize_distributed()
    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    runtime.setup_model_parallel(parallel)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    checked = 0
    for family in FAMILIES:
        ckpt = root / family / "megatron"
        cfg = model_config_from_yaml(ckpt / "config.yaml")
        if not cfg.untie_embeddings_and_output_weights and not torch.cuda.is_available():
            continue  # Megatron moves a tied output layer with .cuda() at PP>1: not patched for CPU
        model = build.build_gpt_model(cfg, parallel, backend="torch", pre_process=stage == 0, post_process=stage == 1)
        sharded = build.canonical_sharded_state_dict(model, metadata={"non_homogeneous_layers": True})
        model.load_state_dict(dist_checkpointing.load({"model": sharded}, str(ckpt))["model"], strict=False)
        hf_config = json.loads((root / family / "hf" / "config.json").read_text())
        arch = architecture_for(hf_config)
        reader = SafetensorsReader(root / family / "hf")
        expected = dict(convert_hf_to_megatron(reader.get, arch.rules(cfg), cfg))
        offset = stage * cfg.num_layers // 2
        for name, tensor in model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            key = build.canonical_key(name)
            if key.startswith("decoder.layers."):
                local, rest = key[len("decoder.layers."):].split(".", 1)
                key = f"decoder.layers.{int(local) + offset}.{rest}"
            if key == "output_layer.weight" and not cfg.untie_embeddings_and_output_weights:
                key = "embedding.word_embeddings.weight"
            assert torch.equal(tensor, expected[key]), (family, stage, name, key)
            checked += 1
    (root / f"pp_stage{stage}_checked.txt").write_text(str(checked))
    runtime.teardown_model_parallel()


if __name__ == "__main__" and "--worker" in sys.argv:
    if "--pp" in sys.argv:
        _pipeline_worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
    else:
        _worker(Path(sys.argv[sys.argv.index("--worker") + 1]), int(sys.argv[sys.argv.index("--tp") + 1]))
    sys.exit(0)


# ----------------------------------------------------------------------------------- tests

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, **kwargs):
    # Free ports: other test suites may run on this machine at the same time.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, **kwargs)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _load_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_tokenizer_dir):
    """Per family: tiny fp32 HF model + HF reference logits, converted to Megatron and back
    (both through the CLIs, in one Python process). Llama goes through several safetensors
    shards + index on both sides."""
    from megatron_sft.testing.tiny_models import build_tiny_hf_model
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("conversion")
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    seqs = [torch.tensor(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in CONVERSATIONS]
    for family in FAMILIES:
        model = build_tiny_hf_model(family, str(root / family / "hf"), tokenizer_dir=str(tiny_tokenizer_dir),
                                    seed=FAMILIES.index(family), max_shard_size="100KB" if family == "llama" else "5GB")
        with torch.no_grad():
            logits = [model(input_ids=s[None]).logits[0] for s in seqs]
        torch.save({"tokens": seqs, "logits": logits}, root / family / "hf_logits.pt")
    script = (
        "import sys\nfrom tools.convert_hf_to_megatron import main as a\n"
        "from tools.convert_megatron_to_hf import main as b\n"
        "def go():\n"
        f"    for f in {FAMILIES!r}:\n"
        f"        d = '{root}/' + f\n"
        "        assert a(['--hf', d + '/hf', '--out', d + '/megatron', '--tp', '2', '--no-progress']) == 0\n"
        "        shard = ['--max-shard-gb', '0.0001'] if f == 'llama' else []\n"
        "        assert b(['--megatron', d + '/megatron', '--out', d + '/back', '--no-progress'] + shard) == 0\n"
        "if __name__ == '__main__':\n    go()\n"
    )
    (root / "convert_all.py").write_text(script)
    _run([sys.executable, str(root / "convert_all.py")])
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(converted, family):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, back = converted / family / "hf", converted / family / "back"
    a, b = _load_weights(src), _load_weights(back)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    if family == "llama":  # ~100 KB shards on both sides
        assert len(list(src.glob("*.safetensors"))) > 2 and len(set(index["weight_map"].values())) > 2

    ca, cb = AutoConfig.from_pretrained(str(src)).to_dict(), AutoConfig.from_pretrained(str(back)).to_dict()
    for ignored in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        ca.pop(ignored, None), cb.pop(ignored, None)
    assert ca == cb

    ta, tb = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(back))
    assert ta.chat_template == tb.chat_template and ta.get_vocab() == tb.get_vocab()
    text = ta.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    assert (src / "tokenizer.json").read_bytes() == (back / "tokenizer.json").read_bytes()

    gen = json.loads((back / "generation_config.json").read_text())
    assert tb.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]

    model = AutoModelForCausalLM.from_pretrained(str(back))
    assert type(model).__name__ == json.loads((src / "config.json").read_text())["architectures"][0]


@pytest.fixture(scope="module")
def megatron_runs(converted):
    """The torchrun workers at TP=1 (1 process) and TP=2 (2 processes)."""
    for tp in (1, 2):
        _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}", "--master_port",
              str(_free_port()), __file__, "--worker", str(converted), "--tp", str(tp)])
    return converted


def test_pipeline_parallel_stages_load_their_layers(converted):
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
          __file__, "--worker", str(converted), "--pp", "2"])
    # Each stage checked its parameters (layers, norms, embedding / output layer) for the three
    # untied families (Megatron's tied output layer at PP>1 calls .cuda(): not runnable on CPU).
    assert all(int((converted / f"pp_stage{s}_checked.txt").read_text()) >= 15 for s in (0, 1))


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_logits_match_hf(megatron_runs, tp):
    for family in FAMILIES:  # the reference is not degenerate: errors below are meaningful
        assert min(l.std().item() for l in torch.load(megatron_runs / family / "hf_logits.pt")["logits"]) > 0.05
    errors = json.loads((megatron_runs / f"megatron_errors_tp{tp}.json").read_text())
    for family, by_mode in errors.items():
        for mode, per_conversation in by_mode.items():
            assert max(per_conversation) < ATOL, (family, mode, per_conversation)


def test_llama3_rope_scaling_is_exercised(tmp_path):
    """The tiny Llama's RoPE scaling changes its logits far beyond ATOL, so the logits test above
    proves Megatron applies all four llama3 parameters."""
    from megatron_sft.testing.tiny_models import build_tiny_hf_model

    tokens = torch.arange(3, 60)[None]
    scaled = build_tiny_hf_model("llama", seed=0)
    plain = build_tiny_hf_model("llama", seed=0, rope_scaling=None)
    with torch.no_grad():
        diff = (scaled(input_ids=tokens).logits - plain(input_ids=tokens).logits).abs().max().item()
    assert diff > 100 * ATOL


def test_export_of_tp2_trainer_checkpoint(megatron_runs, tmp_path):
    """A checkpoint saved by GPTModel at TP=2 in Megatron's stacked-layer layout, given as a save
    dir (latest iteration), exports bit-equal to the source HF weights; the source config is
    found through ``checkpoint.pretrained`` (so Mistral stays Mistral)."""
    for family in FAMILIES:
        out = tmp_path / family
        _run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron", str(megatron_runs / family / "tp2_save"),
              "--out", str(out), "--no-progress"])
        src = json.loads((megatron_runs / family / "hf" / "config.json").read_text())
        assert json.loads((out / "config.json").read_text())["architectures"] == src["architectures"]
        a, b = _load_weights(megatron_runs / family / "hf"), _load_weights(out)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), family


BF16_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from megatron_sft.conversion import dist_io
from megatron_sft.conversion.convert import hf_to_megatron, megatron_to_hf
from megatron_sft.testing.tiny_models import build_tiny_hf_model

def main(root, tokenizer_dir):
    build_tiny_hf_model("qwen3", str(root / "hf"), dtype=torch.bfloat16, tokenizer_dir=tokenizer_dir)
    hf_to_megatron(root / "hf", root / "mg", progress=False)
    hf_to_megatron(root / "hf", root / "mg32", dtype="fp32", progress=False)
    megatron_to_hf(root / "mg", root / "back", progress=False)
    megatron_to_hf(root / "mg", root / "back32", dtype="fp32", progress=False)
    dtypes = {name: sorted({str(d) for _, d in dist_io.tensor_metadata(root / name).values()}) for name in ("mg", "mg32")}
    (root / "dtypes.json").write_text(json.dumps(dtypes))

if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
"""


def test_bf16_stays_bf16_and_dtype_casts(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "run.py").write_text(BF16_SCRIPT)
    _run([sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(tiny_tokenizer_dir)])
    assert json.loads((tmp_path / "dtypes.json").read_text()) == {"mg": ["torch.bfloat16"], "mg32": ["torch.float32"]}
    src, back, back32 = (_load_weights(tmp_path / n) for n in ("hf", "back", "back32"))
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], src[k]) for k in src)
    assert all(back32[k].dtype == torch.float32 and torch.equal(back32[k], src[k].float()) for k in src)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "back32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_export_reports_a_missing_checkpoint_file(converted, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(converted / "llama" / "megatron", broken)
    for shard in broken.glob("*.distcp"):
        shard.unlink()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron", str(broken), "--out",
                           str(tmp_path / "out"), "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: cannot read" in proc.stderr and str(broken) in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing that looks like a finished export
