"""HF -> Megatron -> short SFT run -> HF: the exported model loads in transformers, its logits
match the trained Megatron model's (loaded at TP=2), and it ships the training chat template.

Runs the real CLIs: convert_hf_to_megatron, preprocess_data, pretrain_sft (3 steps on CPU),
convert_megatron_to_hf; Megatron runs in subprocesses (its CPU patches are process-global).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ATOL = 2e-5
# The training template differs from the tokenizer's own (a default system prompt), so the
# exported tokenizer must carry the one used in training, not the original.
SYSTEM_PREFIX = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a tiny model."
                 "<|im_end|>\n{% endif %}")


def _worker(root: Path) -> None:
    """torchrun worker (TP=2): load the trained checkpoint as the trainer does, write logits."""
    sys.path.insert(0, str(REPO))
    import torch
    import yaml

    import megatron_sft.mcore  # noqa: F401  (before any megatron.core import)
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_sft.config import ParallelConfig
    from megatron_sft.conversion.convert import model_config_from_yaml
    from megatron_sft.model import build, runtime
    from megatron_sft.training import checkpoint as ckpt
    from megatron_sft.training.model_setup import load_model_state, model_sharded_state_dict

    runtime.initialize_distributed()
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    runtime.setup_model_parallel(parallel)
    path = ckpt.checkpoint_path(str(root / "save"))
    cfg = model_config_from_yaml(Path(path) / "config.yaml")
    assert yaml.safe_load((Path(path) / "config.yaml").read_text())["model"]["add_qkv_bias"] is True
    model = build.build_gpt_model(cfg, parallel, backend="torch").eval()
    load_model_state([model], ckpt.load_checkpoint(path, model_sharded_state_dict([model])))
    seqs = torch.load(root / "tokens.pt")
    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                          cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    with torch.no_grad():
        out = model(input_ids=torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                    attention_mask=None, packed_seq_params=psp)
    logits = gather_from_tensor_model_parallel_region(out)[0]
    if torch.distributed.get_rank() == 0:
        torch.save(list(logits.split(lengths)), root / "megatron_logits.pt")
    runtime.teardown_model_parallel()


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
    sys.exit(0)


import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args):
    # Free ports: other test suites may run on this machine at the same time.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def test_sft_from_converted_model_exports_back(tmp_path, tiny_tokenizer_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.conversion.tiny_models import build_tiny_hf_model
    from megatron_sft.data.tiny_tokenizer import CHATML_TEMPLATE

    # Qwen2.5-style (QKV bias, tied embeddings): the most demanding of the key maps.
    build_tiny_hf_model("qwen2", str(tmp_path / "hf"), tokenizer_dir=str(tiny_tokenizer_dir))
    _run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf", str(tmp_path / "hf"),
          "--out", str(tmp_path / "converted"), "--no-progress"])
    template = tmp_path / "train_template.jinja"
    template.write_text(SYSTEM_PREFIX + CHATML_TEMPLATE)
    _run([sys.executable, "tools/preprocess_data.py", "--input", "examples/data/sample_conversations.jsonl",
          "--tokenizer", str(tmp_path / "converted" / "tokenizer"), "--chat-template", str(template),
          "--output-prefix", str(tmp_path / "data" / "train"), "--seq-length", "512", "--no-progress"])

    config = yaml.safe_load((REPO / "yaml_configs" / "tiny_cpu.yaml").read_text())
    config["model"] = yaml.safe_load((tmp_path / "converted" / "config.yaml").read_text())["model"]
    config["model"]["attention_backend"] = "torch"
    config["data"].update(train_prefix=str(tmp_path / "data" / "train"), valid_prefix=str(tmp_path / "data" / "train"))
    config["training"].update(train_steps=3, eval_interval_steps=3, lr_warmup_steps=1)
    config["checkpoint"] = {"save": str(tmp_path / "save"), "save_interval_steps": 3,
                            "pretrained": str(tmp_path / "converted")}
    config["logging"].update(tensorboard=False, log_interval=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _run([sys.executable, "pretrain_sft.py", "--config", str(tmp_path / "train.yaml")])

    _run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron", str(tmp_path / "save"),
          "--out", str(tmp_path / "exported"), "--no-progress"])
    exported = tmp_path / "exported"

    tok = AutoTokenizer.from_pretrained(str(exported))
    assert tok.chat_template == template.read_text()
    gen = json.loads((exported / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]

    before, after = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(exported / "model-00001-of-00001.safetensors"))
    assert set(before) == set(after)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.bias"], after["model.layers.0.self_attn.q_proj.bias"])

    conversations = [[{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "Paris."}],
                     [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}]]
    seqs = [torch.tensor(tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in conversations]
    torch.save(seqs, tmp_path / "tokens.pt")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
          __file__, "--worker", str(tmp_path)])
    megatron_logits = torch.load(tmp_path / "megatron_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    for seq, reference in zip(seqs, megatron_logits):
        with torch.no_grad():
            hf_logits = model(input_ids=seq[None]).logits[0]
        assert (hf_logits - reference).abs().max().item() < ATOL
