"""Training inputs: open and check the packed datasets, and turn the sample stream into this
rank's micro-batches, step by step.

Each optimizer step takes the next ``global_batch_size`` samples of the stream
(``sampler.SampleStream``); data-parallel rank r builds micro-batches from its contiguous share.
Every rank of a model-parallel group builds the same micro-batches (all pipeline stages need the
packed sequence layout; the CP split is done per CP rank by ``build_micro_batch``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_sft.config import SFTConfig
from megatron_sft.data.batches import MicroBatch, build_micro_batch, padding_multiples
from megatron_sft.errors import SFTError
from megatron_sft.processes import helper_process_init
from megatron_sft.training.sampler import SampleStream, micro_batches, rank_slice

logger = logging.getLogger("megatron_sft")


class DataError(SFTError, ValueError):
    """A dataset that cannot be trained on with this config (message says which and why)."""


def open_datasets(prefixes: Sequence[str], cfg: SFTConfig, role: str) -> list:
    """Open every prefix of ``role`` (train/valid) and check it against the config: files
    present and consistent, packs within data.seq_length, tokenizer vocab within the model's."""
    from megatron_sft.data import PackedDataset

    datasets, problems = [], []
    for prefix in prefixes:
        try:
            ds = PackedDataset(prefix)
        except (FileNotFoundError, ValueError, OSError) as err:
            problems.append(f"{role} data {prefix}: {err}")
            continue
        meta = ds.meta
        if len(ds) == 0:
            problems.append(f"{role} data {prefix} holds no packs: re-run tools/preprocess_data.py")
        vocab = meta.get("vocab_size")
        if vocab is not None and vocab > cfg.model.vocab_size:
            problems.append(f"{role} data {prefix} was tokenized with {meta.get('tokenizer')} of {vocab} tokens > "
                            f"model.vocab_size={cfg.model.vocab_size}: raise model.vocab_size to >= {vocab} "
                            "or use the model's own tokenizer")
        seq = meta.get("seq_length")
        if seq is not None and seq > cfg.data.seq_length:
            problems.append(f"{role} data {prefix} was packed for seq_length {seq} > data.seq_length="
                            f"{cfg.data.seq_length}: set --data.seq_length={seq} or re-run preprocessing "
                            f"with --seq-length {cfg.data.seq_length}")
        datasets.append(ds)
    templates = {ds.meta.get("chat_template_sha256") for ds in datasets} - {None}
    if len(templates) > 1:
        problems.append(f"{role} datasets were rendered with {len(templates)} different chat templates: "
                        "preprocess all of them with the same tokenizer and template")
    if problems:
        raise DataError("\n".join(problems))
    return datasets


def check_tokenizers(datasets: Sequence, cfg: SFTConfig) -> None:
    """DataError unless every train and valid prefix was tokenized with the same tokenizer (the
    meta's vocab hash) and, when ``checkpoint.pretrained`` is a converted model with a
    ``tokenizer/`` folder, with that tokenizer (``data.tokenizer_identity``)."""
    from megatron_sft.data.tokenizer_identity import check_same_tokenizer

    reference = _pretrained_tokenizer(cfg.checkpoint.pretrained)
    try:
        check_same_tokenizer({ds.prefix: ds.meta for ds in datasets}, reference)
    except ValueError as err:
        raise DataError(str(err)) from None


def _pretrained_tokenizer(pretrained: Optional[str]):
    """(name, identity) of the tokenizer shipped in a converted checkpoint, or None."""
    folder = os.path.join(pretrained, "tokenizer") if pretrained else None
    if folder is None or not os.path.isdir(folder):
        return None
    from transformers import AutoTokenizer

    from megatron_sft.data.tokenizer_identity import HASH_KEY, vocab_sha256

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises many types; the data check must not hide the run's real error
        logger.warning("cannot load %s to compare with the data's tokenizer (%s: %s)", folder, type(err).__name__, err)
        return None
    name = f"checkpoint.pretrained tokenizer {folder}"
    return name, {"tokenizer": folder, "vocab_size": len(tokenizer), HASH_KEY: vocab_sha256(tokenizer)}


def source_names(datasets: Sequence) -> List[str]:
    """Names of the input files behind ``source_index`` values, over all datasets in order:
    dataset d's source s is entry ``offsets[d] + s`` (see ``source_offsets``)."""
    names = []
    for ds in datasets:
        inputs = (ds.meta.get("settings") or {}).get("inputs") or []
        names.extend(os.path.splitext(os.path.basename(str(p)))[0] for p in inputs)
        if not inputs:
            names.append(os.path.basename(ds.prefix))
    return names


def source_offsets(datasets: Sequence) -> List[int]:
    offsets, total = [], 0
    for ds in datasets:
        offsets.append(total)
        total += max(len((ds.meta.get("settings") or {}).get("inputs") or []), 1)
    return offsets


FP8_TOKEN_MULTIPLE = 16
"""Transformer Engine's FP8 GEMMs need the token dimension to divide by 16."""


def rank_token_multiple(cfg: SFTConfig) -> int:
    """What each rank's token count must divide by beyond the parallel layout (FP8: 16)."""
    return FP8_TOKEN_MULTIPLE if cfg.training.fp8 else 1


def fixed_micro_batch_length(datasets: Sequence, cfg: SFTConfig) -> Optional[int]:
    """Length every micro-batch is padded to, or None when lengths may vary.

    Interleaved pipelines (virtual size > 1) exchange activations of one static shape, so each
    micro-batch is padded to the longest ``micro_batch_size`` packs of ``datasets`` can get once
    every conversation is padded for the layout, rounded up to the layout's total multiple."""
    p = cfg.parallel
    if (p.virtual_pipeline_model_parallel_size or 1) <= 1:
        return None
    conv_multiple, total_multiple = padding_multiples(p.context_parallel_size, p.tensor_model_parallel_size,
                                                      p.sequence_parallel, rank_token_multiple(cfg))
    longest = max(ds.max_padded_pack_length(conv_multiple) for ds in datasets)
    length = cfg.training.micro_batch_size * longest
    return -(-length // total_multiple) * total_multiple


@dataclass
class BatchBuilder:
    """Builds this rank's micro-batches from (dataset, sample) pairs; ``pad_to_length`` fixes
    their length (see ``fixed_micro_batch_length``)."""

    datasets: Sequence
    offsets: Sequence[int]
    cfg: SFTConfig
    cp_rank: int = 0
    pad_to_length: Optional[int] = None

    def pack(self, dataset_index: int, sample_index: int) -> dict:
        pack = dict(self.datasets[dataset_index][sample_index])
        pack["source_index"] = pack["source_index"] + self.offsets[dataset_index]
        pack["pack_index"] = f"{sample_index} of {self.datasets[dataset_index].prefix}"
        return pack

    def micro_batch(self, samples: Sequence[Tuple[int, int]], zero_weight: bool = False) -> MicroBatch:
        p = self.cfg.parallel
        batch = build_micro_batch(
            [self.pack(d, i) for d, i in samples],
            seq_length=self.cfg.data.seq_length,
            loss_mode=self.cfg.training.loss_normalization,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            sequence_parallel=p.sequence_parallel,
            context_parallel_size=p.context_parallel_size,
            context_parallel_rank=self.cp_rank,
            pad_to_length=self.pad_to_length,
            rank_token_multiple=rank_token_multiple(self.cfg),
        )
        if zero_weight:  # filler so every rank runs the same number of micro-batches
            batch.loss_weight.zero_()
            batch.num_real_tokens = batch.num_targets = 0
        return batch


def step_samples(stream: SampleStream, position: int, cfg: SFTConfig, dp_rank: int, dp_size: int):
    """This rank's micro-batches (lists of (dataset, sample)) of the step starting at stream
    ``position``."""
    gbs = cfg.training.global_batch_size
    batch = [stream.peek(p) for p in range(position, position + gbs)]
    return micro_batches(rank_slice(batch, dp_rank, dp_size), cfg.training.micro_batch_size)


class _StepStream(torch.utils.data.IterableDataset):
    """Infinite per-step lists of micro-batches from a stream position (worker w of n builds
    steps w, w+n, ...; the DataLoader returns them in step order)."""

    def __init__(self, builder: BatchBuilder, stream: SampleStream, start: int, dp_rank: int, dp_size: int):
        self.builder, self.stream, self.start = builder, stream, start
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        gbs = self.builder.cfg.training.global_batch_size
        step = worker
        while True:
            position = self.start + step * gbs
            groups = step_samples(self.stream, position, self.builder.cfg, self.dp_rank, self.dp_size)
            yield [self.builder.micro_batch(g) for g in groups]
            step += num_workers


def train_batches(builder: BatchBuilder, stream: SampleStream, dp_rank: int, dp_size: int,
                  num_workers: int) -> Iterator[List[MicroBatch]]:
    """Per-step micro-batch lists from ``stream.consumed_samples`` on (the stream itself is
    advanced by the trainer, one global batch per step)."""
    dataset = _StepStream(builder, SampleStream(stream.sizes, stream.weights, stream.seed),
                          stream.consumed_samples, dp_rank, dp_size)
    if num_workers == 0:
        return iter(dataset)
    # Workers ignore SIGTERM (the trainer saves on it; SLURM signals every process) and die with
    # the trainer (megatron_sft/processes.py).
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         collate_fn=lambda x: x, persistent_workers=True,
                                         worker_init_fn=functools.partial(helper_process_init, parent_pid=os.getpid()))
    return iter(loader)


def micro_batch_multiple(cfg: SFTConfig) -> int:
    """What each rank's number of micro-batches per schedule run must divide by: the pipeline
    size with interleaving (Megatron runs micro-batches in groups of PP per model chunk), else 1."""
    p = cfg.parallel
    return p.pipeline_model_parallel_size if (p.virtual_pipeline_model_parallel_size or 1) > 1 else 1


def eval_micro_batches(builder: BatchBuilder, sizes: Sequence[int], cfg: SFTConfig, dp_rank: int,
                       dp_size: int, max_batches: Optional[int]) -> List[List[MicroBatch]]:
    """Validation micro-batches per global batch: every pack of every dataset once, in file
    order, split over DP ranks; ranks left short get zero-weight fillers, and so does a rank's
    list short of a multiple of ``micro_batch_multiple`` (a last batch of 1 micro-batch under
    PP=2 x VP=2 runs as 1 real + 1 filler). Fillers add exactly 0 to the loss sums and counts."""
    samples = [(d, i) for d, size in enumerate(sizes) for i in range(size)]
    gbs, mbs = cfg.training.global_batch_size, cfg.training.micro_batch_size
    batches = [samples[i:i + gbs] for i in range(0, len(samples), gbs)]
    if max_batches is not None:
        batches = batches[:max_batches]
    multiple = micro_batch_multiple(cfg)
    out = []
    for batch in batches:
        per_rank = -(-len(batch) // dp_size)
        mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        num_micro = -(-per_rank // mbs)
        num_micro = -(-num_micro // multiple) * multiple
        groups = [mine[i * mbs:(i + 1) * mbs] for i in range(num_micro)]
        out.append([builder.micro_batch(g) if g else builder.micro_batch([samples[0]], zero_weight=True)
                    for g in groups])
    return out


def describe_pack(pack: dict, tokenizer_path: Optional[str], max_chars: int = 2000) -> str:
    """The pack decoded conversation by conversation, supervised target tokens inside «...»
    (what a person checks first when a run misbehaves). Token ids when no tokenizer loads."""
    decode = _decoder(tokenizer_path)
    tokens, mask, cu = pack["tokens"], pack["loss_mask"], pack["cu_seqlens"]
    parts = []
    for c, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        text, inside = [], False
        for j in range(int(start), int(end)):
            if bool(mask[j]) != inside:
                text.append("«" if mask[j] else "»")
                inside = bool(mask[j])
            text.append(decode(int(tokens[j])))
        parts.append(f"--- conversation {c} ({end - start} tokens) ---\n" + "".join(text) + ("»" if inside else ""))
    out = "\n".join(parts)
    return out if len(out) <= max_chars else out[:max_chars] + f"... [{len(out) - max_chars} more chars]"


def _decoder(tokenizer_path: Optional[str]):
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        return lambda token: tokenizer.decode([token])
    except Exception:  # no tokenizer at that path (moved data, synthetic tests): show ids
        return lambda token: f"[{token}]"
