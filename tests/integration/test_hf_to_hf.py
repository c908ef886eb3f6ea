"""HF model -> training -> HF model, through the real CLIs and the README's commands:

    convert_hf_to_megatron --hf ORG/NAME      (a hub name, served offline from a Hugging Face cache)
    preprocess_data --tokenizer ORG/NAME
    pretrain_sft --config recipes/sft_converted_1gpu.yaml --config recipes/cpu.yaml
                 --checkpoint.pretrained=CONVERTED   (no model section written anywhere)
    convert_megatron_to_hf

then transformers loads the export and its loss on the validation data equals the trainer's
eval_loss (fp32), and the export ships the training chat template and end-of-turn eos ids.

The model is a tiny random Qwen2.5-shaped one (QKV bias, tied embeddings: the most demanding key
map) with the real Qwen2.5 tokenizer and vocabulary from ../shared/fixtures when present, else
the project's own tiny tokenizer (hermetic: a fresh clone and CI run the same path).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import SHARED_FIXTURES
from tests.hf_cache import add_to_hub_cache

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HUB_NAME = "tiny-org/tiny-qwen2.5-chat"
RTOL = 1e-5
# The training template differs from the tokenizer's own (a default system prompt), so the
# exported tokenizer must carry the one used in training, not the original.
SYSTEM_PREFIX = ("{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a tiny model."
                 "<|im_end|>\n{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, hf_home: Path):
    # Offline, with a cache of our own: hub names must resolve from it, never from the network.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port()),
           "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{args}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _tokenizer_and_vocab(tiny_tokenizer_dir):
    real = SHARED_FIXTURES / "tokenizers" / "qwen2.5-instruct"
    if (real / "vocab.json").is_file():
        return real, 151936  # Qwen2.5's embedding rows (> its 151665 tokens)
    return tiny_tokenizer_dir, 512


def _hf_loss(model, prefix: str):
    """sum(ce) / supervised tokens over every conversation of the packed set, each run alone,
    with the data contract: labels[j] = tokens[j+1], weight loss_mask[j+1], within a conversation."""
    from megatron_sft.data import PackedDataset

    total, count = 0.0, 0
    ds = PackedDataset(prefix)
    for i in range(len(ds)):
        pack = ds[i]
        for start, end in zip(pack["cu_seqlens"][:-1], pack["cu_seqlens"][1:]):
            tokens = torch.from_numpy(pack["tokens"][start:end].astype(np.int64))
            weight = torch.from_numpy(pack["loss_mask"][start + 1:end].astype(np.float64))
            with torch.no_grad():
                logits = model(input_ids=tokens[None]).logits[0, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="none")
            total += float((ce * weight).sum())
            count += int(weight.sum())
    del ds
    return total / count, count


def test_hf_folder_to_training_to_transformers(tmp_path, tiny_tokenizer_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sft.testing.tiny_models import build_tiny_hf_model
    from megatron_sft.testing.tiny_tokenizer import CHATML_TEMPLATE

    tokenizer_dir, vocab_size = _tokenizer_and_vocab(tiny_tokenizer_dir)
    hf, hf_home = tmp_path / "hf", tmp_path / "hf_home"
    build_tiny_hf_model("qwen2", str(hf), tokenizer_dir=str(tokenizer_dir), vocab_size=vocab_size)
    add_to_hub_cache(hf_home / "hub", HUB_NAME, hf)
    converted, data, save = tmp_path / "converted", tmp_path / "data" / "sft", tmp_path / "save"

    _run(["tools/convert_hf_to_megatron.py", "--hf", HUB_NAME, "--out", str(converted), "--no-progress"], hf_home)
    template = tmp_path / "train_template.jinja"
    template.write_text(SYSTEM_PREFIX + CHATML_TEMPLATE)
    _run(["tools/preprocess_data.py", "--input", "examples/data/sample_conversations.jsonl", "--tokenizer", HUB_NAME,
          "--chat-template", str(template), "--output-prefix", str(data), "--seq-length", "512", "--no-progress"],
         hf_home)
    _run(["pretrain_sft.py", "--config", "yaml_configs/recipes/sft_converted_1gpu.yaml",
          "--config", "yaml_configs/recipes/cpu.yaml", f"--checkpoint.pretrained={converted}",
          f"--data.train_prefix={data}", f"--data.valid_prefix={data}", "--data.seq_length=512",
          "--training.train_steps=3", "--training.global_batch_size=4", "--training.lr=1e-3",
          "--training.lr_warmup_steps=1", "--training.eval_interval_steps=3", "--training.lm_head_chunk_tokens=512",
          f"--checkpoint.save={save}", f"--checkpoint.load={save}", "--checkpoint.save_interval_steps=3",
          "--logging.tensorboard=false", "--logging.log_interval=1"], hf_home)
    _run(["tools/convert_megatron_to_hf.py", "--megatron", str(save), "--out", str(tmp_path / "exported"),
          "--no-progress"], hf_home)
    exported = tmp_path / "exported"

    # The run's model section is the converted one (the recipe has none), attention backend aside.
    trained = yaml.safe_load((save / "iter_0000003" / "config.yaml").read_text())["model"]
    assert trained == {**yaml.safe_load((converted / "config.yaml").read_text())["model"], "attention_backend": "torch"}

    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    eval_loss = [r for r in records if "eval_loss" in r][-1]
    assert eval_loss["step"] == 3
    model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    hf_loss, hf_tokens = _hf_loss(model, str(data))
    assert hf_tokens == eval_loss["eval_tokens"]
    assert hf_loss == pytest.approx(eval_loss["eval_loss"], rel=RTOL)
    first_loss = next(r["loss"] for r in records if "loss" in r)
    assert hf_loss < first_loss  # it trained

    tok = AutoTokenizer.from_pretrained(str(exported))
    assert tok.chat_template == template.read_text()
    gen = json.loads((exported / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    before = load_file(str(hf / "model.safetensors"))
    after = load_file(str(exported / "model-00001-of-00001.safetensors"))
    assert set(before) == set(after)
    key = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(before[key], after[key])
