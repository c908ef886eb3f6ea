"""GPU check of converted checkpoints in the Transformer Engine backend (run on the GPU box;
skipped without CUDA / Transformer Engine): for every family the converted checkpoint's keys are
exactly the TE model's, every TE parameter loads the HF tensor it came from (fused norm weights
``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, QKV bias, QK-norm), and the
TE model's bf16 logits on packed THD input match HF run on each conversation alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _worker(root: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    import megatron_sft.mcore  # noqa: F401
    from megatron.core import dist_checkpointing
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_sft.config import ParallelConfig
    from megatron_sft.conversion.common import architecture_for, convert_hf_to_megatron
    from megatron_sft.conversion.convert import model_config_from_yaml
    from megatron_sft.conversion.hf_io import SafetensorsReader
    from megatron_sft import runtime
    from megatron_sft.model import build

    runtime.initialize_distributed()
    parallel = ParallelConfig()
    runtime.setup_model_parallel(parallel)
    results = {}
    for family in FAMILIES:
        ckpt = root / family / "megatron"
        cfg = model_config_from_yaml(ckpt / "config.yaml")
        model = build.build_gpt_model(cfg, parallel, backend="te").eval()
        sharded = build.canonical_sharded_state_dict(model, metadata={"non_homogeneous_layers": True})
        assert set(dist_checkpointing.load_tensors_metadata(str(ckpt))) == {v.key for v in sharded.values()}
        model.load_state_dict(dist_checkpointing.load({"model": sharded}, str(ckpt))["model"], strict=False)
        reader = SafetensorsReader(root / family / "hf")
        expected = dict(convert_hf_to_megatron(reader.get, architecture_for(
            json.loads((root / family / "hf" / "config.json").read_text())).rules(cfg), cfg))
        for name, value in sharded.items():
            assert torch.equal(value.data.cpu(), expected[value.key]), (family, name)
        model = model.to(torch.bfloat16)
        seqs = [s.cuda() for s in torch.load(root / "tokens.pt")]
        lengths = [len(s) for s in seqs]
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                              cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
        with torch.no_grad():
            out = model(input_ids=torch.cat(seqs)[None], position_ids=positions, attention_mask=None,
                        packed_seq_params=psp)[0].float()
        results[family] = [t.cpu() for t in out.split(lengths)]
    torch.save(results, root / "te_logits.pt")
    runtime.teardown_model_parallel()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
    sys.exit(0)


import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.gpu


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _te_available(), reason="needs CUDA and Transformer Engine")
def test_converted_checkpoints_in_te_backend(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from megatron_sft.testing.tiny_models import build_tiny_hf_model

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    conversations = [[{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "The capital of France is Paris."}],
                     [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}]]
    seqs = [torch.tensor(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in conversations]
    torch.save(seqs, tmp_path / "tokens.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hf_logits = {}
    for i, family in enumerate(FAMILIES):
        model = build_tiny_hf_model(family, str(tmp_path / family / "hf"), tokenizer_dir=str(tiny_tokenizer_dir), seed=i)
        model = model.to("cuda", torch.bfloat16)
        with torch.no_grad():
            hf_logits[family] = [model(input_ids=s[None].cuda()).logits[0].float().cpu() for s in seqs]
        proc = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(tmp_path / family / "hf"),
                               "--out", str(tmp_path / family / "megatron"), "--no-progress"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-4000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port", "29731",
                           __file__, "--worker", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    te_logits = torch.load(tmp_path / "te_logits.pt")
    for family in FAMILIES:
        for ours, theirs in zip(te_logits[family], hf_logits[family]):
            # bf16 on both sides: relative error ~1e-2; a wrong key map gives ~1.
            assert ((ours - theirs).norm() / theirs.norm()).item() < 5e-2, family
