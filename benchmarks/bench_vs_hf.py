#!/usr/bin/env python
"""Our trainer vs Hugging Face transformers peers: same packs, same model shape, same optimizer.

One command on one GPU machine; every system runs in its own process, one after the other:

    python benchmarks/bench_vs_hf.py --seq-length 16384 --ours "te_bf16=" --ours "te_fp8=--training.fp8=tensorwise"
    python benchmarks/bench_vs_hf.py --seq-length 65536 --global-batch 1 --steps 8 \
        --peers hf_flex_bf16,hf_flex_bf16_lean,hf_sdpa_leaks \
        --ours "te_bf16=" --ours "te_recompute=--training.recompute_granularity=selective"
    python benchmarks/bench_vs_hf.py --seq-length 131072 --global-batch 1 --steps 8 \
        --peers hf_flex_bf16,hf_flex_bf16_lean,hf_sdpa_leaks \
        --ours "te_bf16=" --ours "te_recompute=--training.recompute_granularity=selective"
    python benchmarks/bench_vs_hf.py --device cpu --tiny --steps 4 --warmup 1      # CPU smoke run

Data (``--data-dir``, reused when there): the tiny tokenizer, synthetic chats
(benchmarks/make_synthetic_chats.py), tools/preprocess_data.py. 16K: 3,000 chats (seed 1, as
benchmarks/gpu_run.sh). 64K and up: long agent-like conversations of 76-96% of a pack (100-126K
tokens at 128K) plus short chats filling the rest of the packs.

Systems, all on the same packs in the trainer's own order, minimising sum(CE over supervised
targets) / targets of the step over ``--global-batch`` packs (micro batch 1 pack), with AdamW and
the config's lr schedule, betas, weight decay (not on norms) and gradient clipping:
  ours (--ours NAME=ARGS)  pretrain_sft.py --config CONFIG ARGS
  hf_flex_bf16       LlamaForCausalLM, bf16 params, flex_attention, document BlockMask
  hf_flex_amp        fp32 params, autocast bf16, the same mask
  hf_sdpa_leaks      bf16, SDPA over the whole pack as one causal sequence (conversations see each other)
  hf_flex_bf16_lean  (optional) hf_flex_bf16 + gradient checkpointing + logits only at targets
Writes ``--out-dir``/bench_vs_hf_TAG.{json,md} (logs in bench_vs_hf_TAG_logs/), prints the table.
On CPU flex_attention has no backward: flex peers train on the same mask_mod as a dense SDPA mask
and run their isolation check with flex forward (uncompiled) on the BlockMask.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

from megatron_sft.config import load_config
from megatron_sft.data.labels import IGNORE_INDEX, shift_labels, target_mask
from megatron_sft.training.flops import PEAK_TFLOPS, causal_pairs, step_flops
from megatron_sft.training.sampler import SampleStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = PEAK_TFLOPS[("H200", "bf16")]  # 989 dense bf16 TFLOP/s
PEERS = {  # attention: flex (document mask) | causal (one sequence); parameter dtype; autocast; lean
    "hf_flex_bf16": dict(attention="flex", dtype=torch.bfloat16, amp=False, lean=False),
    "hf_flex_amp": dict(attention="flex", dtype=torch.float32, amp=True, lean=False),
    "hf_sdpa_leaks": dict(attention="causal", dtype=torch.bfloat16, amp=False, lean=False),
    "hf_flex_bf16_lean": dict(attention="flex", dtype=torch.bfloat16, amp=False, lean=True),
}
NOTE = ("Useful FLOPs are counted as MFU counts: the whole model at every real position, however it is computed "
        "(dense layers and LM head per real token, causal attention within each conversation, x3 for forward + "
        "backward: `megatron_sft.training.flops.step_flops`), the same count for every row. The SDPA row does more "
        "work than counted (attention across conversations), and its conversations see each other (it leaks). HF rows "
        "pad each pack to the sequence length (a document of its own, not counted as real tokens) and take fp32 "
        "cross-entropy on our shifted labels. Their random init is HF's (Megatron scales output projections by "
        "1/sqrt(2L)), so losses compare in trend only.")


# ---------------------------------------------------------------------------------- data
def chat_files(args, tok_dir: str) -> list[list[str]]:
    """make_synthetic_chats.py arguments, one list per JSONL file, for ``args.seq_length``."""
    s = args.seq_length
    if args.tiny:
        return [["--records", "200", "--max-turns", "4", "--max-words", "40", "--seed", "1"]]
    if s < 65536:
        return [["--records", "3000", "--seed", "1"]]
    import random

    from make_synthetic_chats import make_long_record
    from transformers import AutoTokenizer

    # Calibrate: tokens per word of a long conversation, chat markup included (tiny tokenizer: ~4.0).
    record = make_long_record(random.Random(0), 20000, 20000, 30)
    ids = AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(record["messages"], tokenize=True)
    per_word = len(ids["input_ids"] if hasattr(ids, "keys") else ids) / 20000
    num_long = args.steps * args.global_batch + 16
    return [["--records", str(num_long), "--min-words", str(int(0.76 * s / per_word)), "--max-total-words",
             str(int(0.96 * s / per_word)), "--max-turns", "40", "--seed", "3"],
            ["--records", str(num_long * (s // 12000)), "--seed", "1"]]  # fillers, ~1.8K tokens each


def prepare_data(args) -> str:
    """Tokenizer, chats and packs under ``args.data_dir``; returns the packed prefix (reused if present)."""
    from megatron_sft.testing.tiny_tokenizer import build_tiny_tokenizer

    tok_dir = os.path.join(args.data_dir, "tok")
    prefix = os.path.join(args.data_dir, f"train_{args.seq_length}" + ("_tiny" if args.tiny else ""))
    if os.path.exists(prefix + ".meta.json"):
        return prefix
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        build_tiny_tokenizer(tok_dir)
    generator_args = chat_files(args, tok_dir)
    inputs = [f"{prefix}_chats{i}.jsonl" for i in range(len(generator_args))]
    for path, gen_args in zip(inputs, generator_args):
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_synthetic_chats.py"),
                        "--out", path, *gen_args], check=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", ",".join(inputs),
           "--tokenizer", tok_dir, "--output-prefix", prefix, "--seq-length", str(args.seq_length),
           "--workers", "8", "--on-error", "skip", "--no-progress"]
    status, _ = run_logged(cmd, prefix + ".preprocess.log", args.timeout)
    if status != "ok":
        raise RuntimeError(f"preprocessing failed ({status}):\n{log_tail(prefix + '.preprocess.log')}")
    return prefix


def step_packs(num_packs: int, seed: int, steps: int, global_batch: int) -> list[list[int]]:
    """Pack indices of each optimizer step: the trainer's SampleStream order (one dataset, DP 1)."""
    stream = SampleStream([num_packs], None, seed)
    return [[i for _, i in stream.next_global_batch(global_batch)] for _ in range(steps)]


def step_stats(ds, order: list[list[int]], model_cfg) -> list[dict]:
    """Per step: real tokens, supervised targets, useful FLOPs (flops.step_flops, as MFU counts)."""
    stats = []
    for step in order:
        packs = [ds[i] for i in step]
        tokens = sum(len(p["tokens"]) for p in packs)
        pairs = causal_pairs(np.concatenate([np.diff(p["cu_seqlens"]) for p in packs]))
        stats.append({"tokens": tokens, "flops": step_flops(model_cfg, tokens, pairs),
                      "targets": sum(int(target_mask(p["loss_mask"], p["cu_seqlens"]).sum()) for p in packs)})
    return stats


def data_stats(ds, order, stats, seq_length: int) -> dict:
    lengths = np.concatenate([np.diff(ds[i]["cu_seqlens"]) for i in sorted({i for s in order for i in s})])
    return {"prefix": ds.prefix, "packs": len(ds), "conversations": len(ds.conversation_lengths),
            "real_tokens": ds.num_tokens, "fill": ds.num_tokens / (len(ds) * seq_length),
            "benchmark_packs": len({i for s in order for i in s}), "benchmark_conversations": len(lengths),
            "benchmark_conversation_tokens_median": float(np.median(lengths)),
            "benchmark_conversation_tokens_max": int(lengths.max()),
            "supervised_fraction": sum(s["targets"] for s in stats) / max(1, sum(s["tokens"] for s in stats))}


# ---------------------------------------------------------------------------------- HF peers
def llama_config(model_cfg):
    """A transformers LlamaConfig of our ModelConfig's shape (transformers 5 ``rope_parameters``)."""
    from transformers import LlamaConfig

    m, rope = model_cfg, {"rope_type": "default", "rope_theta": model_cfg.rotary_base}
    if m.rope_scaling is not None:
        rope.update(vars(m.rope_scaling))  # rope_type llama3, factor, low/high_freq_factor, original_max_...
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads, rms_norm_eps=m.norm_epsilon,
        max_position_embeddings=m.max_position_embeddings, initializer_range=m.init_method_std,
        rope_parameters=rope, tie_word_embeddings=not m.untie_embeddings_and_output_weights, use_cache=False)


def pack_arrays(pack: dict, seq_length: int, attention: str) -> dict:
    """A pack as fixed-length inputs (static shapes: compiled flex is built once), labels by our contract.

    The pad tail is a document of its own. ``flex``: positions restart at 0 in each conversation;
    ``causal``: positions 0..seq_length-1 (one sequence over the whole pack).
    Example: cu_seqlens [0, 3, 5], seq_length 6 -> doc_ids 0 0 0 1 1 2, position_ids 0 1 2 0 1 0."""
    tokens, cu = np.asarray(pack["tokens"], np.int64), np.asarray(pack["cu_seqlens"], np.int64)
    n = len(tokens)
    assert n <= seq_length, (n, seq_length)
    labels = np.full(seq_length, IGNORE_INDEX, np.int64)
    labels[:n] = shift_labels(tokens, pack["loss_mask"], cu)
    lengths = np.append(np.diff(cu), seq_length - n) if n < seq_length else np.diff(cu)
    positions = np.arange(seq_length)
    if attention == "flex":
        positions = positions - np.repeat(np.cumsum(lengths) - lengths, lengths)
    target_index = np.flatnonzero(labels != IGNORE_INDEX)
    return {"input_ids": np.pad(tokens, (0, seq_length - n)), "position_ids": positions,
            "doc_ids": np.repeat(np.arange(len(lengths)), lengths), "target_index": target_index,
            "target_ids": labels[target_index]}


_DOC_MASKS: dict = {}


def same_document_causal(doc: torch.Tensor):
    """flex mask_mod: query q sees key kv when both are in the same conversation and kv <= q."""
    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)
    return mask_mod


def document_block_mask(doc_ids: torch.Tensor, device):
    """Same-conversation causal BlockMask of ``doc_ids`` [n].

    One mask_mod and one device buffer per (n, device), refilled in place each call: the mask_mod's
    closure stays the same object, so the compiled builder (GPU) is traced once, not once per pack
    (a fresh closure per pack made torch.compile re-trace every step). A mask is valid until the
    next call with the same n; every caller uses it before building the next one."""
    from torch.nn.attention.flex_attention import create_block_mask

    n, key = len(doc_ids), (len(doc_ids), str(device))
    if key not in _DOC_MASKS:
        doc = torch.zeros(n, dtype=torch.int64, device=device)
        cuda = torch.device(device).type == "cuda"  # the eager build would materialise S x S
        _DOC_MASKS[key] = (doc, same_document_causal(doc), torch.compile(create_block_mask) if cuda else create_block_mask)
    doc, mask_mod, build = _DOC_MASKS[key]
    doc.copy_(doc_ids)
    return build(mask_mod, 1, None, n, n, device)


def to_device(arrays: dict, mask_kind: str, device) -> dict:
    """Tensors on ``device`` plus ``mask``: same conversation and causal, as a flex BlockMask
    (``block``), that mask dense [1,1,S,S] bool for SDPA (``dense``), or None (``none``: causal)."""
    from torch.nn.attention.flex_attention import create_mask

    batch = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in arrays.items()}
    doc, n = batch["doc_ids"], len(arrays["doc_ids"])
    batch["mask"] = None
    if mask_kind == "dense":
        batch["mask"] = create_mask(same_document_causal(doc), 1, 1, n, n, device)
    elif mask_kind == "block":
        batch["mask"] = document_block_mask(doc, device)
    return batch


def attention_plan(attention: str, device, train: bool) -> tuple[str, str]:
    """(transformers attn_implementation, mask kind). CPU flex has no backward: train on the dense mask."""
    if attention == "causal":
        return "sdpa", "none"
    if torch.device(device).type == "cuda":
        return "flex_attention", "block"
    return ("sdpa", "dense") if train else ("flex_eager", "block")


def register_flex_eager() -> None:
    """``flex_eager``: torch's flex_attention uncompiled (CPU, forward only); transformers' own
    ``flex_attention`` always wraps it in torch.compile, which needs a GPU for the backward."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AttentionInterface

    def flex_eager(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = flex_attention(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("flex_eager", flex_eager)


def autocast(amp: bool, device):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def build_model(model_cfg, spec: dict, device, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(spec["dtype"])  # as from_pretrained(dtype=...): RoPE's inv_freq stays fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(model_cfg)).train()
    finally:
        torch.set_default_dtype(default_dtype)
    rope_type = model.config.rope_parameters["rope_type"]
    if getattr(model.model.rotary_emb, "rope_type", rope_type) != rope_type:  # a transformers without rope_parameters
        raise RuntimeError(f"transformers {model.model.rotary_emb.rope_type} RoPE, expected {rope_type}: upgrade to 5.x")
    model.config._attn_implementation = attention_plan(spec["attention"], device, train=True)[0]
    if spec["lean"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(model, training, device):
    """AdamW grouped as Megatron does: no weight decay on 1-D params (``wd_mult``, read by the scheduler)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "wd_mult": 1.0},
              {"params": [p for p in params if p.ndim < 2], "wd_mult": 0.0}]
    return torch.optim.AdamW(groups, lr=training.lr, betas=(training.adam_beta1, training.adam_beta2),
                             eps=training.adam_eps, weight_decay=training.weight_decay,
                             fused=torch.device(device).type == "cuda")


def pack_loss(model, batch: dict, spec: dict, device) -> torch.Tensor:
    """Sum of fp32 cross-entropy over the pack's supervised targets (our labels; HF's own shift unused)."""
    with autocast(spec["amp"], device):
        out = model(input_ids=batch["input_ids"][None], position_ids=batch["position_ids"][None],
                    attention_mask=batch["mask"], use_cache=False,
                    **({"logits_to_keep": batch["target_index"]} if spec["lean"] else {}))
        logits = out.logits[0] if spec["lean"] else out.logits[0].index_select(0, batch["target_index"])
    return torch.nn.functional.cross_entropy(logits.float(), batch["target_ids"], reduction="sum")


def hf_step(model, optimizer, scheduler, packs: list, spec: dict, seq_length: int, clip_grad: float, device) -> float:
    """One optimizer step, one micro-batch per pack; returns sum CE / supervised targets of the step."""
    arrays = [pack_arrays(p, seq_length, spec["attention"]) for p in packs]
    num_targets = max(1, sum(len(a["target_index"]) for a in arrays))
    mask_kind = attention_plan(spec["attention"], device, train=True)[1]
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for a in arrays:
        loss = pack_loss(model, to_device(a, mask_kind, device), spec, device) / num_targets
        loss.backward()
        total += loss.detach()
    if scheduler is not None:
        scheduler.step(1)  # as our trainer: update k uses lr(k)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return float(total)


@torch.no_grad()
def isolation_diff(model, pack: dict, seq_length: int, spec: dict, device, max_positions: int = 2048):
    """Max |logit difference| of conversation 2 in ``pack`` vs alone (None: fewer than 2 conversations),
    at up to ``max_positions`` of its positions: rounding when isolated, large when conversations mix."""
    cu = np.asarray(pack["cu_seqlens"], np.int64)
    if len(cu) < 3 or cu[2] <= cu[1]:
        return None
    a, b = int(cu[1]), int(cu[2])
    alone = {"tokens": pack["tokens"][a:b], "loss_mask": pack["loss_mask"][a:b], "cu_seqlens": np.array([0, b - a])}
    keep = np.unique(np.linspace(0, b - a - 1, min(max_positions, b - a)).astype(np.int64))
    impl, mask_kind = attention_plan(spec["attention"], device, train=False)
    model.config._attn_implementation, logits = impl, []
    try:
        for p, offset in ((pack, a), (alone, 0)):
            batch = to_device(pack_arrays(p, seq_length, spec["attention"]), mask_kind, device)
            with autocast(spec["amp"], device):
                hidden = model.model(input_ids=batch["input_ids"][None], position_ids=batch["position_ids"][None],
                                     attention_mask=batch["mask"], use_cache=False).last_hidden_state[0]
                logits.append(model.lm_head(hidden[torch.as_tensor(keep + offset, device=device)]).float())
    finally:
        model.config._attn_implementation = attention_plan(spec["attention"], device, train=True)[0]
    return float((logits[0] - logits[1]).abs().max())


def train_peer(spec: dict, cfg, prefix: str, steps: int, global_batch: int, device) -> dict:
    """Build, check isolation, train ``steps`` optimizer steps: times, losses, peak memory."""
    from megatron_sft.data import PackedDataset
    from megatron_sft.training.optimizer import build_scheduler

    ds, cuda = PackedDataset(prefix), torch.device(device).type == "cuda"
    order = step_packs(len(ds), cfg.data.seed, steps, global_batch)
    model = build_model(cfg.model, spec, device, cfg.training.seed)
    candidates = [i for step in order for i in step] + list(range(min(len(ds), 1000)))
    iso = next((i for i in candidates if len(ds[i]["cu_seqlens"]) >= 3), None)
    iso_diff = None if iso is None else isolation_diff(model, ds[iso], cfg.data.seq_length, spec, device)
    optimizer = make_optimizer(model, cfg.training, device)
    scheduler = build_scheduler(cfg, optimizer)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in order:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(hf_step(model, optimizer, scheduler, [ds[i] for i in step], spec, cfg.data.seq_length,
                              cfg.training.clip_grad, device))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    attention = {"flex": "flex BlockMask" if cuda else "dense doc mask (CPU; flex: isolation only)",
                 "causal": "SDPA, one causal sequence (leaks)"}[spec["attention"]]
    return {"status": "ok", "step_times_s": times, "losses": losses, "isolation_max_abs_diff": iso_diff,
            "isolation_pack": iso, "attention": attention + (" + ckpt, logits at targets" if spec["lean"] else ""),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def gemm_ceiling(reps: int = 20) -> dict:
    """Median bf16 matmul TFLOP/s, M x K x N: a square and the model's MLP shape; plus the GPU."""
    out = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    for m, k, n in ((8192, 8192, 8192), (16384, 2048, 8192)):
        a, b = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for shape in ((m, k), (k, n)))
        times = []
        for i in range(reps + 5):  # 5 warm-ups
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[f"tflops_{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times[5:]) / 1e12
    out["ceiling_tflops"] = max(v for key, v in out.items() if key.startswith("tflops_"))
    return out


def run_peer(args) -> int:
    """Child process (``--peer NAME``): one JSON result to ``--peer-out``; OOM and errors become a status."""
    try:
        if args.peer == "gemm":
            result = {"status": "ok", **gemm_ceiling()}
        else:
            register_flex_eager()
            cfg = bench_config(args, args.prefix)
            result = train_peer(PEERS[args.peer], cfg, args.prefix, args.steps, args.global_batch, args.device)
    except torch.OutOfMemoryError as err:
        result = {"status": "OOM", "error": str(err).splitlines()[0][:400]}
    except Exception as err:  # an OOM inside torch.compile arrives wrapped
        result = {"status": "OOM" if "out of memory" in str(err) else "failed",
                  "error": f"{type(err).__name__}: {err}"[:400], "traceback": traceback.format_exc()}
    with open(args.peer_out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"})[:2000])
    return 0


# ---------------------------------------------------------------------------------- processes
def log_tail(path: str, lines: int = 8) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])
    return ""


def run_logged(cmd: list[str], log_path: str, timeout: float) -> tuple[str, int | None]:
    """Run ``cmd`` in its own process group, output to ``log_path``: (ok | OOM | failed | timeout, rc)."""
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           **os.environ, "PYTHONUNBUFFERED": "1"}
    with socket.socket() as s:  # a free rendezvous port for pretrain_sft's one-process group
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
            proc.wait()
            return "timeout", None
    with open(log_path, errors="replace") as f:
        oom = any(s in f.read() for s in ("OutOfMemoryError", "out of memory"))
    return ("ok" if rc == 0 else "OOM" if oom else "failed"), rc


def bench_overrides(args, prefix: str) -> list[str]:
    """Config overrides shared by our trainer and the peers' copy of its settings."""
    return [f"--data.train_prefix={prefix}", "--data.valid_prefix=null", f"--data.seq_length={args.seq_length}",
            f"--training.train_steps={args.steps}", f"--training.global_batch_size={args.global_batch}",
            "--training.eval_interval_steps=0", "--checkpoint.save=null", "--checkpoint.save_interval_steps=0",
            "--checkpoint.load=null", "--logging.log_interval=1", "--logging.tensorboard=false",
            *(["--training.lr_warmup_steps=0"] if args.tiny else [])]  # tiny_cpu.yaml warms up 20 steps


def bench_config(args, prefix: str):
    return load_config(args.config, bench_overrides(args, prefix), world_size=1, has_cuda=True)


def run_ours(extra: list[str], args, prefix: str, run_dir: str) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_sft.py"), "--config", args.config,
           *bench_overrides(args, prefix), f"--logging.dir={run_dir}", *extra]
    log, metrics = os.path.join(run_dir, "train.log"), os.path.join(run_dir, "metrics.jsonl")
    status, rc = run_logged(cmd, log, args.timeout)
    records = []
    with contextlib.suppress(OSError), open(metrics) as f:
        records = [r for r in map(json.loads, f) if "loss" in r and "step_time_s" in r]
    memory = [r["memory_gib"] for r in records if r.get("memory_gib") is not None and args.device == "cuda"]
    return {"status": status, "returncode": rc, "command": shlex.join(cmd),
            "step_times_s": [r["step_time_s"] for r in records], "losses": [r["loss"] for r in records],
            "reported_tflops": [r.get("tflops_per_gpu") for r in records],
            "peak_memory_gib": max(memory, default=None), "attention": f"Megatron THD {shlex.join(extra)}".strip(),
            "log_tail": None if status == "ok" else log_tail(log)}


def run_child(peer: str, args, prefix: str, log_dir: str) -> dict:
    out, log = os.path.join(log_dir, f"{peer}.json"), os.path.join(log_dir, f"{peer}.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", peer, "--prefix", prefix, "--peer-out", out,
           "--config", args.config, "--seq-length", str(args.seq_length), "--steps", str(args.steps),
           "--global-batch", str(args.global_batch), "--device", args.device, *(["--tiny"] if args.tiny else [])]
    status, _ = run_logged(cmd, log, args.timeout)
    result = {"status": status}
    with contextlib.suppress(OSError), open(out) as f:
        result = json.load(f)
    if result["status"] != "ok":
        result["log_tail"] = log_tail(log)
    return result


# ---------------------------------------------------------------------------------- report
def summarize(name: str, kind: str, raw: dict, stats: list[dict], warmup: int, ceiling) -> dict:
    """One table row; medians over the steps after ``warmup`` (over all steps if none are left)."""
    row = {"system": name, "kind": kind, "status": raw["status"], "attention": raw.get("attention"),
           "peak_memory_gib": raw.get("peak_memory_gib"), "isolation_max_abs_diff": raw.get("isolation_max_abs_diff"),
           "error": raw.get("error") or raw.get("log_tail"), "command": raw.get("command")}
    times, losses = raw.get("step_times_s") or [], raw.get("losses") or []
    steps = range(min(len(times), len(stats)))
    if row["status"] != "ok" or not steps:
        return row
    timed = [i for i in steps if i >= warmup] or list(steps)
    tflops = statistics.median(stats[i]["flops"] / times[i] / 1e12 for i in timed)
    row.update(step_time_s=statistics.median(times[i] for i in timed), tflops=tflops, mfu=tflops / PEAK,
               tokens_per_s=statistics.median(stats[i]["tokens"] / times[i] for i in timed),
               mfu_gemm=tflops / ceiling if ceiling else None, timed_steps=[i + 1 for i in timed],
               loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None)
    return row


def add_ratios(rows: list[dict]) -> str | None:
    """Each ours row: its tokens/s over the best HF row that isolates conversations (flex rows only)."""
    correct = [r for r in rows if r["kind"] == "hf" and PEERS.get(r["system"], {}).get("attention") == "flex"]
    best = max((r for r in correct if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"], default=None)
    for r in rows:
        ok = best and r["kind"] == "ours" and r.get("tokens_per_s")
        r["vs_best_hf_flex"] = r["tokens_per_s"] / best["tokens_per_s"] if ok else None
    return best and best["system"]


def _f(value, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, fmt) + suffix


def error_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "out of memory" in line]
    return (errors or lines or [""])[-1]


def render_markdown(result: dict, best: str | None) -> str:
    d, env, g = result["data"], result["env"], result["gemm"]
    gemm = ("bf16 GEMM ceiling, median of 20 (M x K x N): " + ", ".join(f"{k[7:]} {v:.0f}" for k, v in g.items()
            if k.startswith("tflops_")) + " TFLOP/s") if g.get("ceiling_tflops") else f"GEMM ceiling: {g['status']}"
    gpu = env.get("gpu") or "no GPU"
    lines = [f"# Ours vs Hugging Face transformers, {result['seq_length']:,}-token packs ({gpu})",
             "", f"`{result['command']}` ({result['date']}); torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, Transformer Engine {env.get('transformer_engine')}, Megatron-Core "
             f"{env.get('megatron_core')}. {gemm}.", "",
             f"Data: {d['packs']} packs, {d['conversations']} conversations, {d['real_tokens']:,} real tokens (fill "
             f"{d['fill']:.2%}). Benchmark: {result['steps']} steps of {result['global_batch']} packs (micro batch 1 "
             f"pack), {d['benchmark_packs']} packs, {d['benchmark_conversations']} conversations (median "
             f"{d['benchmark_conversation_tokens_median']:,.0f}, max {d['benchmark_conversation_tokens_max']:,} tokens), "
             f"{d['supervised_fraction']:.1%} of tokens supervised; medians over steps {result['warmup'] + 1}-"
             f"{result['steps']}.", "",
             "| system | status | attention | step time (s) | real tokens/s | useful TFLOP/s | MFU (989) | MFU (GEMM) "
             "| peak memory (GiB) | loss first → last | conv. 2 in pack vs alone: max abs Δlogit | tokens/s vs best "
             "HF flex |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        loss = f"{r['loss_first']:.4f} → {r['loss_last']:.4f}" if r.get("loss_first") is not None else "—"
        cells = [r["system"], r["status"], r.get("attention") or "—", _f(r.get("step_time_s"), ".3f"),
                 _f(r.get("tokens_per_s"), ",.0f"), _f(r.get("tflops"), ".1f"), _f(r.get("mfu"), ".1%"),
                 _f(r.get("mfu_gemm"), ".1%"), _f(r.get("peak_memory_gib"), ".1f"), loss,
                 _f(r.get("isolation_max_abs_diff"), ".3g"), _f(r.get("vs_best_hf_flex"), ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", NOTE, f"Ratio: tokens/s over the best HF row that isolates conversations: {best or 'none ran'}."]
    lines += [f"- {r['system']} {r['status']}: {error_line(r['error'])[:300]}" for r in result["rows"] if r["error"]]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: str, tag: str) -> tuple[str, str, str]:
    """Ratios, then ``out_dir``/bench_vs_hf_TAG.json and .md; returns both paths and the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    markdown = render_markdown(result, add_ratios(result["rows"]))
    paths = [os.path.join(out_dir, f"bench_vs_hf_{tag}.{ext}") for ext in ("json", "md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(markdown)
    return paths[0], paths[1], markdown


def versions() -> dict:
    found = {}
    for key, names in (("transformers", ["transformers"]), ("megatron_core", ["megatron-core"]),
                       ("transformer_engine", ["transformer_engine", "transformer-engine", "transformer_engine_torch"])):
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found[key] = found.get(key) or importlib.metadata.version(name)
    return {"torch": torch.__version__, "python": sys.version.split()[0], **found}


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, help="tokens per pack (default 16384; 512 with --tiny)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per system")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--global-batch", type=int, default=4, help="packs per optimizer step (micro batch: 1 pack)")
    p.add_argument("--peers", default="hf_flex_bf16,hf_flex_amp,hf_sdpa_leaks", help=f"of {', '.join(PEERS)}; none")
    p.add_argument("--ours", action="append", metavar="NAME=ARGS", help="our trainer + ARGS (repeatable; none: skip)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    p.add_argument("--data-dir", default="/tmp/bench_vs_hf_data")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tag", help="output file name part (default 16k, 128k, ...)")
    p.add_argument("--config", help="trainer YAML (default yaml_configs/llama3.2_1b_16k.yaml; tiny_cpu.yaml if --tiny)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="smoke mode: tiny_cpu.yaml model, small data and packs")
    p.add_argument("--prepare-only", action="store_true", help="only build the data and print its prefix")
    for hidden in ("--peer", "--prefix", "--peer-out"):  # the child processes
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.seq_length = args.seq_length or (512 if args.tiny else 16384)
    default_config = "tiny_cpu.yaml" if args.tiny else "llama3.2_1b_16k.yaml"
    args.config = args.config or os.path.join(ROOT, "yaml_configs", default_config)
    args.tag = args.tag or (f"tiny_{args.seq_length}" if args.tiny else f"{args.seq_length // 1024}k")
    args.peer_names = [n.strip() for n in args.peers.split(",") if n.strip() not in ("", "none")]
    if set(args.peer_names) - set(PEERS):
        p.error(f"unknown peer(s) {sorted(set(args.peer_names) - set(PEERS))}: choose from {', '.join(PEERS)}")
    specs = args.ours or ["ours="]
    args.ours_variants = [(name, shlex.split(extra)) for name, _, extra in (s.partition("=") for s in specs)
                          if specs != ["none"]]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer:
        return run_peer(args)
    os.makedirs(args.data_dir, exist_ok=True)
    prefix = prepare_data(args)
    if args.prepare_only:
        print(prefix)
        return 0
    from megatron_sft.data import PackedDataset

    cfg, ds = bench_config(args, prefix), PackedDataset(prefix)
    order = step_packs(len(ds), cfg.data.seed, args.steps, args.global_batch)
    stats = step_stats(ds, order, cfg.model)
    log_dir = os.path.join(args.out_dir, f"bench_vs_hf_{args.tag}_logs")
    os.makedirs(log_dir, exist_ok=True)
    gemm = run_child("gemm", args, prefix, log_dir) if args.device == "cuda" else {"status": "skipped on CPU"}
    rows = []
    for name, kind in [(n, "ours") for n, _ in args.ours_variants] + [(n, "hf") for n in args.peer_names]:
        raw = run_ours(dict(args.ours_variants)[name], args, prefix, os.path.join(log_dir, name)) if kind == "ours" \
            else run_child(name, args, prefix, log_dir)
        rows.append(summarize(name, kind, raw, stats, args.warmup, gemm.get("ceiling_tflops")))
        print(f"{name}: {rows[-1]['status']}, step {_f(rows[-1].get('step_time_s'), '.3f')} s", flush=True)
    date = datetime.datetime.now().isoformat("T", "seconds")
    result = {"command": shlex.join([sys.executable, *sys.argv]), "date": date,
              "env": {**versions(), "gpu": gemm.get("gpu"), "cuda": gemm.get("cuda")}, "seq_length": args.seq_length,
              "steps": args.steps, "warmup": args.warmup, "global_batch": args.global_batch, "config": args.config,
              "data": data_stats(ds, order, stats, args.seq_length), "gemm": gemm, "rows": rows,
              "step_packs": order, "step_stats": stats}
    json_path, md_path, markdown = write_outputs(result, args.out_dir, args.tag)
    print(markdown + f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
