"""Worker for the Megatron integration tests; one scenario per process group (Megatron's
patches and parallel state are process-global). Launched by tests/integration/test_mcore.py as

    python -m torch.distributed.run --nproc_per_node N tests/integration/mcore_worker.py SCENARIO ...

and writes ``result.json`` (rank 0) into ``--out``.

Scenarios:
  packed  one process: per-token losses of a packed THD batch vs each conversation run alone
          (SBHD without packing, and THD with one segment), padded layout vs unpadded.
  train   any layout: mcore DDP + get_megatron_optimizer (Adam, fp32, clip_grad 1) + the
          pipeline schedule from get_forward_backward_func for --steps steps; records the global
          loss and per-parameter gradient norms (canonical keys, global layer numbers) each step,
          then the per-token losses of a forward-only pass. Optionally loads a checkpoint first
          (--load), saves the initial (--save-initial) and final (--save-final) weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

import megatron_sft.mcore  # noqa: F401
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sft.config import ModelConfig, ParallelConfig, RopeScalingConfig
from megatron_sft.data.batches import build_micro_batch
from megatron_sft import runtime
from megatron_sft.model.build import (build_model_chunks, canonical_key, canonical_sharded_state_dict,
                                     transformer_config_from)

SEQ_LENGTH = 96
NUM_MICROBATCHES = 4
MODEL = ModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=512,
    max_position_embeddings=256,
    add_qkv_bias=True,
    qk_layernorm=True,
    rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=64),
)


def load_canonical_state_dict(chunk, state_dict) -> None:
    """Load what ``dist_checkpointing.load(canonical_sharded_state_dict(chunk), path)`` returned.

    Strict except for TE's ``_extra_state`` (FP8 metadata, never checkpointed by us): a checkpoint
    from the torch backend lacks it and the TE modules keep their defaults."""
    result = chunk.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]} (model_cfg or attention backend differ from the run that saved it?)"
        )


def make_packs(seed: int, num_packs: int) -> list[dict]:
    """Packs of 2-5 conversations (3..40 tokens) with random supervised runs."""
    rng = np.random.default_rng(seed)
    packs = []
    for index in range(num_packs):
        lengths = []
        while len(lengths) < 5:
            n = int(rng.integers(3, 41))
            if sum(lengths) + n > SEQ_LENGTH:
                break
            lengths.append(n)
        total = sum(lengths)
        mask = (rng.random(total) < 0.6).astype(np.uint8)
        packs.append({
            "tokens": rng.integers(1, MODEL.vocab_size, total).astype(np.int32),
            "loss_mask": mask,
            "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            "record_index": np.arange(len(lengths)),
            "source_index": np.zeros(len(lengths), dtype=np.int64),
            "pack_index": index,
        })
    return packs


def per_token_loss(model, mb):
    if torch.cuda.is_available():
        mb = mb.to(torch.cuda.current_device())
    return model(mb.tokens, mb.position_ids, None, labels=mb.labels.clamp(min=0),
                 packed_seq_params=mb.packed_seq_params)


def config_for(parallel: ParallelConfig, args, **kwargs):
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return transformer_config_from(MODEL, parallel, params_dtype=dtype, bf16=args.bf16, **kwargs)


# ---------------------------------------------------------------------------------- packed
def run_packed(args) -> dict:
    parallel = ParallelConfig()
    real_current_device = torch.cuda.current_device
    runtime.setup_model_parallel(parallel, seed=5)
    runtime.apply_cpu_patches()  # idempotent
    from megatron.core.pipeline_parallel import schedules

    # Patches stay inside Megatron's modules: torch itself is untouched.
    patched = schedules.torch is not torch
    assert torch.cuda.current_device is real_current_device
    (model,) = build_model_chunks(MODEL, parallel, backend=args.backend,
                                  transformer_config=config_for(parallel, args))
    model.eval()
    pack = make_packs(11, 1)[0]
    cu = pack["cu_seqlens"]
    worst_sbhd = worst_thd = worst_padded = 0.0
    with torch.no_grad():
        packed = per_token_loss(model, build_micro_batch([pack], seq_length=SEQ_LENGTH))[0].float().cpu()
        for a, b in zip(cu[:-1], cu[1:]):
            alone_pack = {k: (pack[k][a:b] if k in ("tokens", "loss_mask") else pack[k]) for k in pack}
            alone_pack["cu_seqlens"] = np.array([0, b - a], dtype=np.int32)
            alone_pack["source_index"] = np.zeros(1, dtype=np.int64)
            mb = build_micro_batch([alone_pack], seq_length=SEQ_LENGTH)
            thd = per_token_loss(model, mb)[0].float().cpu()
            plain = mb.to("cuda") if torch.cuda.is_available() else mb
            sbhd = model(plain.tokens, plain.position_ids, None, labels=plain.labels.clamp(min=0))[0].float().cpu()  # no packing
            # The conversation's last position predicts nothing: compare positions with targets.
            keep = mb.labels[0] != -100
            worst_thd = max(worst_thd, (packed[a:b][keep] - thd[keep]).abs().max().item())
            worst_sbhd = max(worst_sbhd, (packed[a:b][keep] - sbhd[keep]).abs().max().item())
        # Padded layout (each conversation to a multiple of 4, total to 128) vs unpadded.
        padded_mb = build_micro_batch([pack], seq_length=SEQ_LENGTH, tensor_model_parallel_size=4,
                                      sequence_parallel=True, pad_to_length=128)
        padded = per_token_loss(model, padded_mb)[0].float().cpu()
        psp = padded_mb.packed_seq_params
        real = torch.cat([torch.arange(s, s + (e - r)) for s, r, e in zip(
            psp.cu_seqlens_q_padded[:-1].tolist(), psp.cu_seqlens_q[:-1].tolist(), psp.cu_seqlens_q[1:].tolist())])
        keep = padded_mb.labels[0, real] != -100
        worst_padded = (padded[real][keep] - packed[keep]).abs().max().item()
    return {"worst_thd": worst_thd, "worst_sbhd": worst_sbhd, "worst_padded": worst_padded,
            "num_conversations": int(cu.size - 1), "megatron_patched": patched, "padded_length": int(padded_mb.tokens.shape[1])}


# ----------------------------------------------------------------------------------- train
def global_param_name(module, name: str) -> str:
    """Parameter name with the global layer number (Megatron numbers layers per stage)."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not match:
        return name
    layer = module.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def grad_norms(chunks) -> dict:
    """Squared gradient norm per canonical parameter key, over the whole model (TP shards summed),
    gathered from every rank."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    local = {}
    for chunk in chunks:
        for name, param in chunk.module.named_parameters():
            sq = param.main_grad.float().pow(2).sum()
            if getattr(param, "tensor_model_parallel", False):
                torch.distributed.all_reduce(sq, group=tp_group)
            local[canonical_key(global_param_name(chunk.module, name))] = sq.item()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        for key, value in part.items():
            merged.setdefault(key, []).append(value)
    return {key: float(np.sqrt(values[0])) for key, values in merged.items()} | {
        "_spread": max(float(np.ptp(values)) for values in merged.values())}


def forward_step(data_iterator, model):
    mb = next(data_iterator)
    if torch.cuda.is_available():
        mb = mb.to(torch.cuda.current_device())
    output = per_token_loss(model, mb)

    def loss_func(output_tensor):
        loss = (output_tensor.float() * mb.loss_weight).sum()
        count = (mb.loss_weight > 0).sum().to(torch.int)  # token mode: weights are 0/1
        # Megatron divides what it is given in place: report clones.
        return loss, count, {"lm loss": torch.stack([loss.detach().clone(), count.detach().float()]),
                             "per_token": output_tensor.detach()[mb.labels != -100].clone()}

    return output, loss_func


def run_schedule(chunks, batches, *, forward_only: bool):
    """(global mean loss over micro-batches and DP ranks, per-token losses at targets of this DP
    rank) on every rank."""
    vp = len(chunks)
    iterators = [iter(batches) for _ in range(vp)] if vp > 1 else iter(batches)
    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=chunks if vp > 1 else chunks[0],
        num_microbatches=len(batches), seq_length=SEQ_LENGTH, micro_batch_size=1, forward_only=forward_only)
    value = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        total = torch.stack([d["lm loss"] for d in results]).sum(0)
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        value = ((total[0] / total[1]).item(), torch.cat([d["per_token"] for d in results]).tolist())
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return next(v for v in gathered if v is not None)


def sharded_state(chunks) -> dict:
    return {f"model{i}": canonical_sharded_state_dict(chunk) for i, chunk in enumerate(chunks)}


def save(chunks, path: str) -> None:
    os.makedirs(path, exist_ok=True)  # dist_checkpointing wants an existing, empty folder
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state(chunks), path)


def run_train(args) -> dict:
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              virtual_pipeline_model_parallel_size=args.vpp, sequence_parallel=args.sp)
    runtime.setup_model_parallel(parallel, seed=7)
    # --fixed-length: every micro-batch padded to SEQ_LENGTH, shapes not exchanged between stages.
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = config_for(parallel, args, **(recompute if args.recompute else {}))
    if args.fixed_length:
        config.variable_seq_lengths = False
    chunks = build_model_chunks(MODEL, parallel, backend=args.backend, transformer_config=config)
    result = {}
    if args.load:
        state = dist_checkpointing.load(sharded_state(chunks), args.load)
        for i, chunk in enumerate(chunks):
            load_canonical_state_dict(chunk, state[f"model{i}"])
    if args.save_initial:
        save(chunks, args.save_initial)
        if torch.distributed.get_rank() == 0:
            result["checkpoint_keys"] = sorted(dist_checkpointing.load_tensors_metadata(args.save_initial))
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    chunks = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=args.bf16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=False), chunks)
    batch_kwargs = dict(seq_length=SEQ_LENGTH, tensor_model_parallel_size=args.tp, sequence_parallel=args.sp,
                        pad_to_length=SEQ_LENGTH if args.fixed_length else None)
    packs = make_packs(3, NUM_MICROBATCHES * args.steps)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def micro_batches(packs: list) -> list:  # this DP rank's share of the global batch
        return [build_micro_batch([p], **batch_kwargs) for p in packs[dp_rank::dp_size]]

    result["losses"], result["grad_norms"] = [], []
    for step in range(args.steps):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        loss, _ = run_schedule(chunks, micro_batches(packs[step * NUM_MICROBATCHES:(step + 1) * NUM_MICROBATCHES]), forward_only=False)
        result["losses"].append(loss)
        result["grad_norms"].append(grad_norms(chunks))
        update_successful, total_norm, _ = optimizer.step()
        assert update_successful
        result.setdefault("total_grad_norms", []).append(float(total_norm))
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        result["eval_loss"], result["eval_token_losses"] = run_schedule(
            chunks, micro_batches(make_packs(4, NUM_MICROBATCHES)), forward_only=True)
    if args.save_final:
        save([chunk.module for chunk in chunks], args.save_final)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["packed", "train"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--fixed-length", action="store_true")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--backend", choices=["torch", "te"], default="torch")
    parser.add_argument("--bf16", action="store_true", help="bf16 params and compute (GPU)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--load")
    parser.add_argument("--save-initial")
    parser.add_argument("--save-final")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime.initialize_distributed()  # gloo on CPU, nccl on GPU
    try:
        result = run_packed(args) if args.scenario == "packed" else run_train(args)
        if torch.distributed.get_rank() == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        runtime.teardown_model_parallel()


if __name__ == "__main__":
    main()
