"""Worker for tests/integration/test_lm_head.py: the supervised chunked LM head against
Megatron's own output layer + cross-entropy on a real GPTModel (torch backend, fp32, CPU/gloo).

    python -m torch.distributed.run --nproc_per_node N tests/integration/lm_head_worker.py --out DIR [--tp 2] [--sp] [--tied]

For one packed micro-batch: ``sum(w * ce)`` and every parameter's gradient, once through
``model(..., labels=...)`` (logits at every position) and once through the ``output_processor``
hook with ``supervised_head_loss`` (logits at supervised positions, 7 at a time). Rank 0 writes
the largest differences (over all ranks' shards) to ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import megatron_sft.mcore  # noqa: F401
from megatron_sft.config import ParallelConfig
from megatron_sft.data.batches import build_micro_batch
from megatron_sft import runtime
from megatron_sft.model.build import build_model_chunks, transformer_config_from
from megatron_sft.model.lm_head import SupervisedTargets, supervised_head_loss
sys.path.insert(0, str(Path(__file__).parent))
from mcore_worker import MODEL, SEQ_LENGTH, make_packs  # noqa: E402  (the scenario's model and data)


def gradients(model) -> dict:
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def compare(args) -> dict:
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, sequence_parallel=args.sp)
    runtime.setup_model_parallel(parallel, seed=7)
    model_cfg = MODEL.__class__(**{**MODEL.__dict__, "untie_embeddings_and_output_weights": not args.tied})
    (model,) = build_model_chunks(model_cfg, parallel, backend="torch",
                                  transformer_config=transformer_config_from(model_cfg, parallel))
    mb = build_micro_batch(make_packs(3, 2), seq_length=SEQ_LENGTH, loss_mode="turn",
                           tensor_model_parallel_size=args.tp, sequence_parallel=args.sp)
    weight = mb.loss_weight
    full = model(mb.tokens, mb.position_ids, None, labels=mb.model_labels(), packed_seq_params=mb.packed_seq_params)
    full_sum = torch.where(weight > 0, full * weight, torch.zeros_like(full)).sum()
    full_sum.backward()
    full_grads = gradients(model)
    targets = SupervisedTargets.from_batch(mb.labels, weight, mb.source_index, chunk_tokens=7)
    head_sum, token_loss = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params,
                                 output_processor=supervised_head_loss, output_processor_context=targets)
    head_sum.backward()
    head_grads = gradients(model)
    assert set(full_grads) == set(head_grads), set(full_grads) ^ set(head_grads)
    worst = max((full_grads[k] - head_grads[k]).abs().max().item() for k in full_grads)
    scale = max(g.abs().max().item() for g in full_grads.values())
    token_diff = (full[weight > 0] - token_loss).abs().max().item()
    local = torch.tensor([worst, scale, abs(full_sum.item() - head_sum.item()), token_diff], dtype=torch.float64)
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return {"grad_max_diff": local[0].item(), "grad_max_abs": local[1].item(), "loss_diff": local[2].item(),
            "token_loss_diff": local[3].item(), "loss": full_sum.item(), "num_targets": int(targets.positions.numel()),
            "num_positions": int(mb.tokens.numel()), "num_params_compared": len(full_grads)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--tied", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtime.initialize_distributed()
    try:
        result = compare(args)
        if torch.distributed.get_rank() == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        runtime.teardown_model_parallel()


if __name__ == "__main__":
    main()
