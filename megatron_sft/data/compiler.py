"""The preprocessing compiler: chat records -> verified loss masks -> packed Megatron files.

Stages (memory stays flat in the input size; only a few numbers per conversation are kept):

1. Stream records (``formats.iter_records``; JSONL lines unparsed), keep this shard's, sample the
   mixture (``mixing``), and encode in ``workers`` processes (``encode_pool``): each parses,
   normalises, masks (``ChatMasker``) and writes kept conversations to its own spill files.
   Results are consumed in input order whatever the number of workers. Pseudo multi-turn needs
   whole conversations in order, so with it records are normalised and merged here first.
2. Pack the lengths (``packing.pack_lengths``), then copy conversations from the spill files
   into the packed file set (``indexed.PackedWriter``) in the packs' seeded order.
3. Write ``.meta.json`` and ``.report.json`` and publish everything by renaming out of a
   temporary folder next to the output, meta last: an interrupted run leaves no file set that
   looks complete.

A bad record never crashes the run: under ``on_error="fail"`` the first one stops it with
``path:line: reason: detail; fix`` (``CompileError``, no output left), under ``"skip"`` it is
counted under its reason (with example locations) in the report. Over-length conversations follow
``overlength``: "drop" treats them as bad records (reason ``too_long``), "truncate" keeps their
first ``seq_length`` tokens and counts them. Data a template silently leaves out (reasoning it
does not render) is counted in the report and warned about once.

Sharding (``num_shards`` N, ``shard_index`` i; one SLURM array task each): shard i takes the
conversations whose first record has ``record_index % N == i`` and writes ``PREFIX_shard{i}``.
``record_index`` stays global, so provenance is the same as in an unsharded run; the shards'
conversations together are the unsharded run's, and their reports' counts add up to its report
(``reports.merge_reports``). Packing is per shard.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megatron_sft.atomic import publish_files
from megatron_sft.data.compile_settings import CompileConfig, config_as_dict  # noqa: F401  (CompileConfig re-exported)
from megatron_sft.data.encode_pool import (Block, Clock, Dropped, EncodePool, EncodeSettings, Encoder, blocks,
                                           encode_in_order, read_spill, start_fork_server)
from megatron_sft.data.formats import RecordError, count_records, iter_records, normalize_record
from megatron_sft.data.mixing import PseudoMultiTurn, sample_mixture
from megatron_sft.data.output_files import clean_stale_staging, make_staging_dir, refuse_existing_output, write_error
from megatron_sft.data.packing import pack_lengths, packing_stats
from megatron_sft.data.reports import CompileError, Tally, build_report, format_summary, reasoning_warning
from megatron_sft.data.tokenizer_identity import HASH_KEY, vocab_sha256
from megatron_sft.data.tokenizer_loading import load_tokenizer, resolve_chat_template, resolve_tokenizer

__all__ = ["CompileConfig", "CompileError", "compile_dataset", "format_summary", "load_tokenizer",
           "resolve_chat_template"]

logger = logging.getLogger("megatron_sft")


@dataclass
class _Item:
    """One conversation (or one bad record) on its way through the ordered pipeline."""

    source_index: int
    record_indices: list[int]
    location: str
    work: tuple[str, object] | None = None  # what a worker encodes (see encode_pool.Encoder.encode_block)
    error: tuple[str, str] | None = None  # (reason, detail) of a record already known bad


# ---------------------------------------------------------------- record stream


def _strip_location(detail: str, location: str) -> str:
    prefix = location + ": "
    return detail[len(prefix):] if detail.startswith(prefix) else detail


def _bad(record, error: RecordError) -> _Item:
    detail = _strip_location(error.detail, record.location)
    return _Item(record.source_index, [record.record_index], record.location, error=(error.reason, detail))


def _items(config: CompileConfig, plan) -> Iterator[_Item]:
    """This shard's sampled records in input order: work for the encoders, or bad records."""
    records = iter_records(config.inputs, config.format_keys, parse_jsonl=config.merges_turns)
    if config.limit is not None:
        records = (r for r, _ in zip(records, range(config.limit)))
    if config.merges_turns:
        yield from _merged_items(config, plan.apply(records))
        return
    if config.num_shards > 1:
        records = (r for r in records if config.in_shard(r.record_index))
    for record in plan.apply(records):  # a record sampled twice arrives twice
        if record.error is not None:
            yield _bad(record, record.error)
        else:
            work = ("line", record.raw) if record.raw is not None else ("payload", record.payload)
            yield _Item(record.source_index, [record.record_index], record.location, work)


def _merged_items(config: CompileConfig, records) -> Iterator[_Item]:
    """Pseudo multi-turn: normalise and merge here (merging needs whole conversations in order);
    every shard merges the whole stream, then keeps the merged conversations of its own."""
    bad: list[_Item] = []

    def good_pairs():
        for record in records:
            try:
                if record.error is not None:
                    raise record.error
                yield record, normalize_record(record.payload, config.format_keys)
            except RecordError as err:
                if config.in_shard(record.record_index):
                    bad.append(_bad(record, err))

    merge = PseudoMultiTurn(config.pseudo_multiturn_prob, config.pseudo_multiturn_max_turns, config.seed)
    for merged in merge(good_pairs()):
        yield from bad
        bad.clear()
        if config.in_shard(merged.record_indices[0]):
            yield _Item(merged.source_index, merged.record_indices, merged.locations[0],
                        ("conversation", merged.conversation))
    yield from bad


def _record_counts(config: CompileConfig, plan) -> tuple[list[int], list[int]]:
    """Per source, this shard's records before and after mixture sampling."""
    read, used = [], []
    for s, summary in enumerate(plan.summary):
        offset, n = plan.offsets[s], config.num_shards
        read.append(len(range((config.shard_index - offset) % n, summary.num_rows_in, n)))
        used.append(int(np.count_nonzero((plan.take[s] + offset) % n == config.shard_index)))
    return read, used


def _limited_counts(inputs: list[str], limit: int | None) -> list[int]:
    counts, left = [], limit
    for path in inputs:
        count = count_records(path)
        if left is not None:
            count = min(count, left)
            left -= count
        counts.append(count)
    return counts


# ---------------------------------------------------------------- stages


class _Kept:
    """Per kept conversation, 5 x 8 bytes in memory; its tokens are in a spill file."""

    def __init__(self):
        self.lengths, self.sources, self.records = array("q"), array("q"), array("q")
        self.spill_ids, self.offsets = array("q"), array("q")
        self.spills: list[str] = []
        self._spill_id: dict[str, int] = {}

    def add(self, item: _Item, spill: str, length: int, offset: int) -> None:
        if spill not in self._spill_id:
            self._spill_id[spill] = len(self.spills)
            self.spills.append(spill)
        self.lengths.append(length)
        self.sources.append(item.source_index)
        self.records.append(item.record_indices[0])
        self.spill_ids.append(self._spill_id[spill])
        self.offsets.append(offset)

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("lengths", "sources", "records", "spill_ids", "offsets")
        return {name: np.frombuffer(getattr(self, name), dtype=np.int64) for name in names}


def _tally(tally: Tally, kept: _Kept, item: _Item, block: Block | None, result) -> None:
    """Count one item's outcome; a kept conversation is recorded in ``kept``."""
    n = len(item.record_indices)
    if item.error is not None:
        tally.drop(item.source_index, n, item.location, *item.error)
        return
    tally.encoded_tokens += result.encoded_tokens
    if isinstance(result, Dropped):
        tally.drop(item.source_index, n, item.location, result.reason, result.detail, result.fix)
        return
    tally.keep(item.source_index, n, result.length, result.supervised, result.by_role, result.truncated)
    if result.reasoning_not_rendered:
        tally.reasoning_dropped(n, result.reasoning_not_rendered, item.location)
    kept.add(item, block.spill, result.length, result.offset)


def _encode_stage(config: CompileConfig, encoder, tally: Tally, plan, clock: Clock) -> _Kept:
    """Stage 1: encode this shard's records into spill files; returns where each kept one is."""
    kept = _Kept()
    merged = {"conversations_in": 0, "conversations_out": 0, "merged_conversations": 0}
    total = sum(_record_counts(config, plan)[1])
    with tqdm(total=total, unit="rec", desc="encode", disable=not config.progress, file=sys.stderr) as bar:
        for block, result in encode_in_order(blocks(_items(config, plan)), encoder, clock):
            results = iter(result.results if result is not None else ())
            for item in block:
                bar.update(len(item.record_indices))
                if item.work is not None:
                    merged["conversations_in"] += len(item.record_indices)
                    merged["conversations_out"] += 1
                    merged["merged_conversations"] += len(item.record_indices) > 1
                _tally(tally, kept, item, result, next(results) if item.work is not None else None)
    if config.merges_turns:
        tally.pseudo_multiturn = merged
    return kept


def _write_packs(config: CompileConfig, kept: dict, spills: list[str], out_prefix: str):
    """Stage 2: pack and write the packed file set under ``out_prefix``."""
    from megatron_sft.data.indexed import PackedWriter

    lengths = kept["lengths"]
    packs = pack_lengths(lengths, config.seq_length, config.seed)
    maps = [read_spill(spill) for spill in spills]
    writer = PackedWriter(out_prefix)
    for pack in tqdm(packs, unit="pack", desc="write", disable=not config.progress, file=sys.stderr):
        where = zip(kept["spill_ids"][pack].tolist(), kept["offsets"][pack].tolist(), lengths[pack].tolist())
        parts = [(maps[s][0][o:o + n], maps[s][1][o:o + n]) for s, o, n in where]
        # add_pack concatenates (copies) the memory-mapped slices.
        writer.add_pack([t for t, _ in parts], [m for _, m in parts], kept["sources"][pack], kept["records"][pack])
    writer.finalize()
    del maps
    return packing_stats(packs, lengths, config.seq_length), writer


def _publish(tmp_prefix: str, final_prefix: str) -> None:
    """Rename the finished files into place; meta last, an old meta removed first, so that a
    crash half way leaves a set without meta, which ``PackedDataset`` refuses."""
    from megatron_sft.data.indexed import meta_path, output_paths

    publish_files(list(zip(output_paths(tmp_prefix), output_paths(final_prefix))), marker=meta_path(final_prefix))


def compile_dataset(config: CompileConfig) -> dict:
    """Run the compiler; returns the report (also written to PREFIX.report.json).

    Raises ValueError for invalid settings and CompileError for a run that must stop (the first
    bad record under on_error="fail", an unusable tokenizer or template, nothing left to write, an
    existing output without ``overwrite``, a disk full / read-only / permission error naming the
    path); in both cases no output file is left behind. Leftover staging folders of interrupted
    runs of the same prefix are removed or reported first (``output_files``).
    """
    config.validate()
    timing = {"started": time.perf_counter()}
    out_prefix = config.shard_output_prefix()
    refuse_existing_output(out_prefix, config.overwrite)
    folder = resolve_tokenizer(config.tokenizer)  # a download happens here, before any worker starts
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
        clean_stale_staging(out_prefix)
        if config.workers > 1:
            start_fork_server()  # imports transformers in the background while this process does too
        tmp_dir = make_staging_dir(out_prefix)
        try:
            template_text = resolve_chat_template(None, config.chat_template) if config.chat_template else None
            settings = EncodeSettings(folder, template_text, config.mode, config.seq_length, config.overlength,
                                      config.format_keys, spill_dir=tmp_dir)
            return _compile(config, settings, tmp_dir, timing)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except OSError as err:  # disk full, read-only, permission: a message with the path, not a traceback
        user_error = write_error(err, out_prefix)
        if user_error is None:
            raise
        raise user_error from err


class _BackgroundImport(threading.Thread):
    """Imports a module in a thread. Megatron-Core (``indexed``) takes ~4 s to import and only
    stage 2 needs it: imported while stage 1 runs, it is off the critical path. Started once
    transformers and torch are imported, so the two threads never import the same modules."""

    def __init__(self, module: str):
        super().__init__(daemon=True)
        self.module, self.error, self._cpu_s = module, None, 0.0
        self.start()

    def run(self) -> None:
        try:
            importlib.import_module(self.module)
        except BaseException as err:  # re-raised in the caller by result()
            self.error = err
        self._cpu_s = time.thread_time()

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return sys.modules[self.module]

    def cpu_s(self) -> float:
        """CPU seconds this thread used so far (0.0 where the platform cannot tell)."""
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.ident)) if self.is_alive() else self._cpu_s
        except (AttributeError, OSError):  # not Unix, or the thread just ended
            return self._cpu_s


def _compile(config: CompileConfig, settings: EncodeSettings, tmp_dir: str, timing: dict) -> dict:
    tokenizer = load_tokenizer(settings.tokenizer, shown=config.tokenizer)
    indexed = _BackgroundImport("megatron_sft.data.indexed")
    try:
        template = resolve_chat_template(tokenizer, config.chat_template)
        counts = _limited_counts(config.inputs, config.limit)
        plan = sample_mixture(counts, config.mixture_ratios or [1.0] * len(counts), config.seed)
        tally = Tally(config.on_error, num_sources=len(config.inputs))
        tally.mixture = plan.to_report()
        clock = Clock()
        timing["startup_s"] = time.perf_counter() - timing["started"]
        cpu_started = time.process_time() - indexed.cpu_s()
        # Workers are forked now and load their tokenizers while the first blocks queue up.
        with (EncodePool(settings, config.workers) if config.workers > 1 else Encoder(settings, tokenizer)) as encoder:
            kept = _encode_stage(config, encoder, tally, plan, clock)
        timing.update(_stage1_timing(timing, clock, time.process_time() - indexed.cpu_s() - cpu_started))
        read, used = _record_counts(config, plan)
        if not kept.lengths:
            timing["total_s"] = time.perf_counter() - timing.pop("started")
            summary = format_summary(build_report(config, tally, read, used, None, timing))
            raise CompileError(f"no conversation survived ({summary})")
        started = time.perf_counter()
        module = indexed.result()
        timing["import_wait_s"] = time.perf_counter() - started
        timing["import_cpu_s"] = indexed.cpu_s()
    finally:
        indexed.join()  # never leave an import running in a thread at interpreter exit
    report = _write_outputs(config, module, tokenizer, template, tally, read, used, kept, tmp_dir, timing)
    warning = reasoning_warning(report)
    if warning:
        logger.warning(warning)
    return report


def _write_outputs(config: CompileConfig, indexed, tokenizer, template: str, tally: Tally, read: list[int],
                   used: list[int], kept: _Kept, tmp_dir: str, timing: dict) -> dict:
    """Stage 2 and 3: pack, write, report, meta, publish; returns the report."""
    tmp_prefix = os.path.join(tmp_dir, os.path.basename(config.shard_output_prefix()))
    started = time.perf_counter()
    stats, writer = _write_packs(config, kept.arrays(), kept.spills, tmp_prefix)
    timing["pack_write_s"] = time.perf_counter() - started
    timing["total_s"] = time.perf_counter() - timing.pop("started")
    report = build_report(config, tally, read, used, stats, timing)
    with open(indexed.report_path(tmp_prefix), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(indexed.meta_path(tmp_prefix), "w", encoding="utf-8") as f:
        json.dump(build_meta(config, tokenizer, template, stats, writer), f, indent=2)
    _publish(tmp_prefix, config.shard_output_prefix())
    return report


def _stage1_timing(timing: dict, clock: Clock, parent_cpu_s: float) -> dict[str, float]:
    """Where stage 1's time went: ``encode_s`` wall, of which this process waited ``wait_s`` for
    workers and used ``parent_cpu_s`` of CPU (all threads but the background import); the
    workers' summed CPU time and slowest start-up. With one worker everything runs here (wait_s
    0, workers_cpu_s = the encoding itself, inside parent_cpu_s); with several, parent_cpu_s /
    encode_s near 1 means this process is the bottleneck."""
    encode_s = time.perf_counter() - timing["started"] - timing["startup_s"]
    return {"encode_s": encode_s, "parent_busy_s": encode_s - clock.wait_s, "parent_cpu_s": parent_cpu_s,
            "wait_s": clock.wait_s, "workers_cpu_s": clock.workers_cpu_s,
            "worker_startup_s": max(clock.worker_startup_s, default=0.0)}


# ---------------------------------------------------------------- meta


def _end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """Single-token end-of-turn markers the template writes (ChatML, Llama 3, Gemma, Phi-3, EOS)."""
    candidates = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>"]
    if tokenizer.eos_token:
        candidates.append(tokenizer.eos_token)
    ids = []
    for token in candidates:
        if token in template or (token == tokenizer.eos_token and "eos_token" in template):
            token_ids = tokenizer.convert_tokens_to_ids([token])
            if token_ids and token_ids[0] is not None and token_ids[0] != tokenizer.unk_token_id and token_ids[0] not in ids:
                ids.append(int(token_ids[0]))
    return ids


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("megatron-sft", "megatron-core", "transformers", "tokenizers", "torch", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def build_meta(config: CompileConfig, tokenizer, template: str, stats, writer) -> dict:
    """The ``.meta.json`` content: what a trainer needs to trust and reproduce the file set."""
    import hashlib

    from megatron_sft.data.indexed import FORMAT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": config.tokenizer,
        HASH_KEY: vocab_sha256(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "end_of_turn_token_ids": _end_of_turn_ids(tokenizer, template),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "chat_template_source": config.chat_template or "tokenizer",
        "chat_template": template,
        "seq_length": config.seq_length,
        "shard": {"index": config.shard_index, "count": config.num_shards} if config.num_shards > 1 else None,
        "mode": config.mode,
        "pack_seed": config.seed,
        "counts": {"num_packs": writer.num_packs, "num_conversations": writer.num_conversations,
                   "num_tokens": writer.num_tokens, "fill_ratio": round(stats.fill_ratio, 6)},
        "settings": config_as_dict(config),
        "versions": _versions(),
    }
