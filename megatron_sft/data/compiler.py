"""The preprocessing compiler: chat records -> verified loss masks -> packed Megatron files.

Stages (memory stays flat in the input size; only per-conversation lengths are kept):

1. Stream records (``formats.iter_records``), sample the mixture (``mixing``), normalise, merge
   pseudo multi-turn, and encode with ``ChatMasker`` in ``workers`` processes. Results come back
   in input order whatever the number of workers. Each encoded conversation is appended to an
   unpacked staging file set (``indexed.ConversationStore``).
2. Pack the lengths (``packing.pack_lengths``), then copy conversations from the staging mmap
   into the packed file set (``indexed.PackedWriter``) in the packs' seeded order.
3. Write ``.meta.json`` and ``.report.json`` and publish everything by renaming out of a
   temporary folder next to the output, meta last: an interrupted run leaves no file set that
   looks complete.

A bad record never crashes the run: under ``on_error="fail"`` the first one stops it with
``path:line: reason: detail`` (``CompileError``, no output left), under ``"skip"`` it is counted
under its reason (with example locations) in the report. Over-length conversations follow
``overlength``: "drop" treats them as bad records (reason ``too_long``), "truncate" keeps their
first ``seq_length`` tokens and counts them.
"""

from __future__ import annotations

import dataclasses
from array import array
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megatron_sft.data.formats import FormatKeys, RecordError, count_records, iter_records, normalize_record
from megatron_sft.data.mixing import MergedConversation, PseudoMultiTurn, sample_mixture
from megatron_sft.data.packing import pack_lengths, packing_stats

MAX_EXAMPLES_PER_REASON = 20
_BLOCK_SIZE = 16  # conversations per task sent to a worker
_BLOCKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: results are consumed in order


class CompileError(RuntimeError):
    """A run that must stop: the first bad record under on_error="fail" (message
    ``path:line: reason: detail``), a tokenizer without chat template, nothing left to write."""


@dataclass
class CompileConfig:
    """Settings of one compiler run (``tools/preprocess_data.py`` flags map onto these)."""

    inputs: list[str]
    """Input files, in order; ``source_index`` is the position in this list."""
    tokenizer: str
    """Tokenizer folder or Hugging Face name (``AutoTokenizer.from_pretrained``)."""
    output_prefix: str
    """Output path prefix: writes PREFIX_tokens.bin/.idx, PREFIX_loss_mask.*, PREFIX_provenance.*,
    PREFIX.meta.json, PREFIX.report.json."""
    seq_length: int
    """Pack capacity in real tokens."""
    chat_template: str | None = None
    """Path of a Jinja chat template file replacing the tokenizer's own."""
    mode: str = "assistant"
    """Which turns are supervised: assistant | all | last_assistant."""
    workers: int = 1
    """Encoding processes; the output is byte-identical for any value."""
    on_error: str = "fail"
    """fail: stop at the first bad record; skip: count it under its reason and go on."""
    overlength: str = "drop"
    """Conversations longer than seq_length: drop (reason too_long) or truncate (keep the head)."""
    mixture_ratios: list[float] | None = None
    """One ratio per input (1.0 = as is, 0.5 = a seeded half, 2.0 = every record twice)."""
    pseudo_multiturn_prob: float = 0.0
    """Probability that a single-turn conversation joins the previous one."""
    pseudo_multiturn_max_turns: int = 1
    """Most single-turn conversations merged into one."""
    seed: int = 1234
    """Seed of mixture sampling, pseudo multi-turn, packing tie-breaks and pack order."""
    format_keys: FormatKeys = field(default_factory=FormatKeys)
    """Key names in the input records."""
    limit: int | None = None
    """Read only the first N records (over all inputs)."""
    progress: bool = True
    """Show tqdm progress bars (stderr)."""

    def validate(self) -> None:
        """Raise ValueError listing every problem at once."""
        problems = []
        if not self.inputs:
            problems.append("no --input given")
        problems += [f"--input {p} does not exist" for p in self.inputs if not os.path.exists(p)]
        if self.seq_length < 1:
            problems.append(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.mode not in ("assistant", "all", "last_assistant"):
            problems.append(f"--mode must be assistant, all or last_assistant, got {self.mode!r}")
        if self.workers < 1:
            problems.append(f"--workers must be >= 1, got {self.workers}")
        if self.on_error not in ("fail", "skip"):
            problems.append(f"--on-error must be fail or skip, got {self.on_error!r}")
        if self.overlength not in ("drop", "truncate"):
            problems.append(f"--overlength must be drop or truncate, got {self.overlength!r}")
        if self.mixture_ratios is not None and len(self.mixture_ratios) != len(self.inputs):
            problems.append(f"--mixture-ratios has {len(self.mixture_ratios)} values for {len(self.inputs)} inputs")
        if self.mixture_ratios is not None and any(not r >= 0 for r in self.mixture_ratios):
            problems.append(f"--mixture-ratios must be >= 0, got {self.mixture_ratios}")
        if not 0.0 <= self.pseudo_multiturn_prob <= 1.0:
            problems.append(f"--pseudo-multiturn-prob must be in [0, 1], got {self.pseudo_multiturn_prob}")
        if self.pseudo_multiturn_max_turns < 1:
            problems.append(f"--pseudo-multiturn-max-turns must be >= 1, got {self.pseudo_multiturn_max_turns}")
        if self.limit is not None and self.limit < 0:
            problems.append(f"--limit must be >= 0, got {self.limit}")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            problems.append(f"--chat-template {self.chat_template} is not a file")
        if problems:
            raise ValueError("invalid preprocessing settings:\n  " + "\n  ".join(problems))


@dataclass
class _Item:
    """One conversation (or one bad record) on its way through the ordered pipeline."""

    source_index: int
    record_indices: list[int]
    location: str
    conversation: object | None = None  # formats.Conversation
    error: tuple[str, str] | None = None  # (reason, detail)


# ---------------------------------------------------------------- tokenizer and workers


_PROBE_TEXT = "Hello, world! The answer is 42."


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained``, refusing a tokenizer that cannot encode text: a folder
    holding only ``tokenizer_config.json`` (no vocabulary files) loads in transformers as a
    tokenizer of a handful of special tokens that maps every word to ``<unk>``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and sum(i == unk for i in ids) * 2 >= len(ids)):
        raise CompileError(
            f"tokenizer {name_or_path} has {len(tokenizer)} tokens and encodes {_PROBE_TEXT!r} as {ids} "
            "(unknown tokens): its vocabulary files (tokenizer.json, or vocab/merges or tokenizer.model) "
            "are missing; point --tokenizer at a complete tokenizer (a template-only folder goes to "
            "--chat-template)"
        )
    return tokenizer


def resolve_chat_template(tokenizer, template_path: str | None) -> str:
    """The template text in use: the file's, else the tokenizer's; CompileError when neither."""
    if template_path is not None:
        with open(template_path, encoding="utf-8") as f:
            return f.read()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise CompileError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template "
            "(reason no_chat_template); pass --chat-template FILE"
        )
    return template


_MASKER = None  # per worker process: built once by _init_worker


def _init_worker(tokenizer, chat_template: str, mode: str) -> None:
    """Build this process's masker once; ``tokenizer`` is a loaded one or a name to load."""
    global _MASKER
    from megatron_sft.data.chat_masks import ChatMasker

    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    _MASKER = ChatMasker(tokenizer, chat_template=chat_template, mode=mode)


def _encode_block(conversations: list) -> list[tuple]:
    """Encode conversations with this process's masker. Per item:
    (input_ids, loss_mask, supervised_tokens_by_role, None) or (None, None, None, (reason, detail))."""
    from megatron_sft.data.chat_masks import MaskError

    results = []
    for conversation in conversations:
        try:
            encoded = _MASKER.encode(conversation.messages, tools=conversation.tools)
            results.append((encoded.input_ids, encoded.loss_mask, dict(encoded.supervised_tokens_by_role), None))
        except MaskError as err:
            results.append((None, None, None, (err.reason, err.detail)))
        except Exception as err:  # a template or tokenizer failing in a way the masker did not name
            results.append((None, None, None, ("encode_error", f"{type(err).__name__}: {err}")))
    return results


def _encoded(items: Iterable[_Item], config: CompileConfig, tokenizer, template: str) -> Iterator[tuple[_Item, tuple | None]]:
    """(item, encode result) in input order; items carrying an error pass through with None."""

    def blocks():
        block = []
        for item in items:
            block.append(item)
            if len(block) == _BLOCK_SIZE:
                yield block
                block = []
        if block:
            yield block

    def todo(block):
        return [item.conversation for item in block if item.error is None]

    def merge(block, results):
        results = iter(results)
        for item in block:
            yield item, (None if item.error is not None else next(results))

    if config.workers == 1:
        _init_worker(tokenizer, template, config.mode)
        for block in blocks():
            yield from merge(block, _encode_block(todo(block)))
        return
    import multiprocessing

    # spawn: no fork of a process holding tokenizer thread pools and tqdm's monitor thread.
    context = multiprocessing.get_context("spawn")
    with context.Pool(config.workers, initializer=_init_worker, initargs=(config.tokenizer, template, config.mode)) as pool:
        pending = deque()
        for block in blocks():
            pending.append((block, pool.apply_async(_encode_block, (todo(block),))))
            if len(pending) >= _BLOCKS_IN_FLIGHT_PER_WORKER * config.workers:
                block, result = pending.popleft()
                yield from merge(block, result.get())
        while pending:
            block, result = pending.popleft()
            yield from merge(block, result.get())


# ---------------------------------------------------------------- record stream


def _strip_location(detail: str, location: str) -> str:
    prefix = location + ": "
    return detail[len(prefix):] if detail.startswith(prefix) else detail


def _items(config: CompileConfig, plan, tally: Tally) -> Iterator[_Item]:
    """Sampled, normalised and (optionally) merged conversations, and the bad records, in order."""
    records = iter_records(config.inputs, config.format_keys)
    if config.limit is not None:
        records = (r for r, _ in zip(records, range(config.limit)))
    bad: deque[_Item] = deque()

    def good_pairs():
        for record in plan.apply(records):
            error = record.error
            if error is None:
                try:
                    pair = (record, normalize_record(record.payload, config.format_keys))
                except RecordError as err:
                    error = err
            if error is not None:
                detail = _strip_location(error.detail, record.location)
                bad.append(_Item(record.source_index, [record.record_index], record.location, error=(error.reason, detail)))
                continue
            yield pair

    if config.pseudo_multiturn_prob > 0 and config.pseudo_multiturn_max_turns > 1:
        pseudo_multiturn = PseudoMultiTurn(config.pseudo_multiturn_prob, config.pseudo_multiturn_max_turns, config.seed)
        tally.pseudo_multiturn = pseudo_multiturn.stats  # updated live as the stream is consumed
        merged = pseudo_multiturn(good_pairs())
    else:
        merged = (MergedConversation(r.source_index, [r.record_index], c, [r.location]) for r, c in good_pairs())
    for conversation in merged:
        while bad:
            yield bad.popleft()
        # A record sampled twice (mixture ratio > 1) arrives twice: its location travels with it.
        yield _Item(conversation.source_index, conversation.record_indices, conversation.locations[0],
                    conversation.conversation)
    while bad:
        yield bad.popleft()


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


def _encode_to_store(config: CompileConfig, tokenizer, template: str, store, tally: Tally, counts: list[int]) -> dict:
    """Stage 1: fill the staging store; returns lengths and provenance arrays."""
    plan = sample_mixture(counts, config.mixture_ratios or [1.0] * len(counts), config.seed)
    tally.mixture = plan.to_report()
    # Per kept conversation only 3 x 8 bytes stay in memory; tokens go to the staging files.
    lengths, sources, records = array("q"), array("q"), array("q")
    seq_length = config.seq_length
    total = sum(s["rows_out"] for s in tally.mixture)
    with tqdm(total=total, unit="rec", desc="encode", disable=not config.progress, file=sys.stderr) as bar:
        for item, result in _encoded(_items(config, plan, tally), config, tokenizer, template):
            bar.update(len(item.record_indices))
            if item.error is None and result[3] is not None:
                item.error = result[3]
            if item.error is not None:
                tally.drop(item.source_index, len(item.record_indices), item.location, *item.error)
                continue
            input_ids, loss_mask, by_role, _ = result
            tally.encoded_tokens += int(input_ids.size)
            truncated = input_ids.size > seq_length
            if truncated and config.overlength == "drop":
                tally.drop(item.source_index, len(item.record_indices), item.location, "too_long",
                           f"{input_ids.size} tokens > --seq-length {seq_length}")
                continue
            if truncated:
                input_ids, loss_mask = input_ids[:seq_length], loss_mask[:seq_length]
            if not loss_mask.any():
                reason = "too_long" if truncated else "no_supervised_tokens"
                tally.drop(item.source_index, len(item.record_indices), item.location, reason,
                           f"no supervised token in the first {input_ids.size} tokens")
                continue
            store.add(input_ids, loss_mask)
            tally.keep(item.source_index, len(item.record_indices), input_ids.size, loss_mask, by_role, truncated)
            lengths.append(int(input_ids.size))
            sources.append(item.source_index)
            records.append(item.record_indices[0])
    return {
        "lengths": np.frombuffer(lengths, dtype=np.int64),
        "source_index": np.frombuffer(sources, dtype=np.int64),
        "record_index": np.frombuffer(records, dtype=np.int64),
    }


def _write_packs(config: CompileConfig, store, kept: dict, out_prefix: str):
    """Stage 2: pack and write the packed file set under ``out_prefix``."""
    from megatron_sft.data.indexed import PackedWriter

    packs = pack_lengths(kept["lengths"], config.seq_length, config.seed)
    tokens, masks = store.reader()
    writer = PackedWriter(out_prefix)
    for pack in tqdm(packs, unit="pack", desc="write", disable=not config.progress, file=sys.stderr):
        # add_pack concatenates (copies) the mmap views before they can go stale.
        writer.add_pack([tokens[i] for i in pack], [masks[i] for i in pack],
                        kept["source_index"][pack], kept["record_index"][pack])
    writer.finalize()
    del tokens, masks
    return packing_stats(packs, kept["lengths"], config.seq_length), writer


def _publish(tmp_prefix: str, final_prefix: str) -> None:
    """Rename the finished files into place; meta last, an old meta removed first, so that a
    crash half way leaves a set without meta, which ``PackedDataset`` refuses."""
    from megatron_sft.data.indexed import meta_path, output_paths

    if os.path.exists(meta_path(final_prefix)):
        os.remove(meta_path(final_prefix))
    for tmp_path, final_path in zip(output_paths(tmp_prefix), output_paths(final_prefix)):
        os.replace(tmp_path, final_path)


def compile_dataset(config: CompileConfig) -> dict:
    """Run the compiler; returns the report (also written to PREFIX.report.json).

    Raises ValueError for invalid settings and CompileError for a run that must stop (the first
    bad record under on_error="fail", no chat template, nothing left to write); in both cases no
    output file is left behind.
    """
    from megatron_sft.data.indexed import ConversationStore, meta_path, report_path

    config.validate()
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.tokenizer)
    template = resolve_chat_template(tokenizer, config.chat_template)
    counts = _limited_counts(config.inputs, config.limit)
    tally = Tally(config.on_error, num_sources=len(config.inputs))
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(config.output_prefix)}.tmp-", dir=out_dir)
    try:
        store = ConversationStore(os.path.join(tmp_dir, "staging"), vocab_size=len(tokenizer))
        kept = _encode_to_store(config, tokenizer, template, store, tally, counts)
        store.finalize()
        if kept["lengths"].size == 0:
            raise CompileError(f"no conversation survived ({format_summary(build_report(config, tally, counts, None, 0.0))})")
        tmp_prefix = os.path.join(tmp_dir, os.path.basename(config.output_prefix))
        stats, writer = _write_packs(config, store, kept, tmp_prefix)
        elapsed = time.perf_counter() - started
        report = build_report(config, tally, counts, stats, elapsed)
        meta = build_meta(config, tokenizer, template, stats, writer)
        with open(report_path(tmp_prefix), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        with open(meta_path(tmp_prefix), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        _publish(tmp_prefix, config.output_prefix)
        return report
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def config_as_dict(config: CompileConfig) -> dict:
    """The settings as JSON-ready values (for meta/report)."""
    values = dataclasses.asdict(config)
    values["format_keys"] = {k: v for k, v in values["format_keys"].items() if k != "role_map"}
    values.pop("progress")
    return values


# ---------------------------------------------------------------- report and meta


class Tally:
    """Counts of one run, filled record by record; ``drop`` raises under on_error="fail"."""

    def __init__(self, on_error: str, num_sources: int):
        self.on_error = on_error
        self.dropped: dict[str, dict] = {}
        self.records_kept = 0
        self.num_conversations = 0
        self.num_truncated = 0
        self.real_tokens = 0
        self.encoded_tokens = 0
        self.supervised_by_role: dict[str, int] = {}
        self.per_source = [
            {"records_kept": 0, "records_dropped": 0, "conversations": 0, "real_tokens": 0, "supervised_tokens": 0}
            for _ in range(num_sources)
        ]
        self.mixture: list[dict] = []
        self.pseudo_multiturn: dict | None = None

    def drop(self, source_index: int, num_records: int, location: str, reason: str, detail: str) -> None:
        if self.on_error == "fail":
            raise CompileError(f"{location}: {reason}: {detail}")
        entry = self.dropped.setdefault(reason, {"records": 0, "examples": []})
        entry["records"] += num_records
        if len(entry["examples"]) < MAX_EXAMPLES_PER_REASON:
            entry["examples"].append(f"{location}: {detail}")
        self.per_source[source_index]["records_dropped"] += num_records

    def keep(self, source_index: int, num_records: int, num_tokens: int, loss_mask: np.ndarray,
             by_role: dict[str, int], truncated: bool) -> None:
        supervised = int(np.count_nonzero(loss_mask))
        if truncated:
            # The masker counted roles over the whole conversation; after the cut only a
            # single-role count can be re-attributed exactly.
            by_role = {next(iter(by_role)): supervised} if len(by_role) == 1 else {"unknown (truncated)": supervised}
            self.num_truncated += 1
        for role, count in by_role.items():
            self.supervised_by_role[role] = self.supervised_by_role.get(role, 0) + int(count)
        self.records_kept += num_records
        self.num_conversations += 1
        self.real_tokens += num_tokens
        source = self.per_source[source_index]
        source["records_kept"] += num_records
        source["conversations"] += 1
        source["real_tokens"] += num_tokens
        source["supervised_tokens"] += supervised


def build_report(config: CompileConfig, tally: Tally, counts: list[int], stats, elapsed_s: float) -> dict:
    """The ``.report.json`` content (``stats``: packing.PackingStats, None before packing)."""
    records_dropped = sum(e["records"] for e in tally.dropped.values())
    mixture = []
    for s, path in enumerate(config.inputs):
        plan = tally.mixture[s] if s < len(tally.mixture) else {}
        source = tally.per_source[s]
        share = source["real_tokens"] / tally.real_tokens if tally.real_tokens else 0.0
        mixture.append({"source_index": s, "path": path, "ratio": plan.get("ratio", 1.0), "records_read": counts[s],
                        "records_used": plan.get("rows_out", counts[s]), **source, "token_share": round(share, 6)})
    return {
        "output_prefix": config.output_prefix,
        "records_read": sum(counts),
        "records_used": sum(m["records_used"] for m in mixture),
        "records_kept": tally.records_kept,
        "records_dropped": records_dropped,
        "dropped": dict(sorted(tally.dropped.items())),
        "truncated": tally.num_truncated,
        "conversations": tally.num_conversations,
        "packs": stats.num_packs if stats else 0,
        "seq_length": config.seq_length,
        "real_tokens": tally.real_tokens,
        "encoded_tokens": tally.encoded_tokens,
        "supervised_tokens": {
            "total": sum(m["supervised_tokens"] for m in mixture),
            "by_role": dict(sorted(tally.supervised_by_role.items())),
            "by_source": [m["supervised_tokens"] for m in mixture],
        },
        "fill_ratio": round(stats.fill_ratio, 6) if stats else 0.0,
        "mixture": mixture,
        "pseudo_multiturn": tally.pseudo_multiturn,
        "workers": config.workers,
        "elapsed_s": round(elapsed_s, 3),
        "tokens_per_s": round(tally.encoded_tokens / elapsed_s, 1) if elapsed_s > 0 else None,
    }


def format_summary(report: dict) -> str:
    """A few lines for a person: what was kept, what was dropped and why, how full the packs are."""
    lines = [
        f"records: {report['records_read']} read, {report['records_used']} used after mixing, "
        f"{report['records_kept']} kept, {report['records_dropped']} dropped, {report['truncated']} truncated",
        f"packs: {report['packs']} x {report['seq_length']} tokens, {report['conversations']} conversations, "
        f"{report['real_tokens']} real tokens, fill {100 * report['fill_ratio']:.2f}%",
        f"supervised tokens: {report['supervised_tokens']['total']} "
        + " ".join(f"{r}={n}" for r, n in report["supervised_tokens"]["by_role"].items()),
    ]
    for reason, entry in report["dropped"].items():
        lines.append(f"dropped {reason}: {entry['records']} (e.g. {entry['examples'][0]})")
    if report.get("tokens_per_s") is not None:
        lines.append(f"{report['tokens_per_s']:.0f} tokens/s with {report['workers']} worker(s), {report['elapsed_s']:.1f} s")
    return "\n".join(lines)


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
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "end_of_turn_token_ids": _end_of_turn_ids(tokenizer, template),
        "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "chat_template_source": config.chat_template or "tokenizer",
        "chat_template": template,
        "seq_length": config.seq_length,
        "mode": config.mode,
        "pack_seed": config.seed,
        "counts": {"num_packs": writer.num_packs, "num_conversations": writer.num_conversations,
                   "num_tokens": writer.num_tokens, "fill_ratio": round(stats.fill_ratio, 6)},
        "settings": config_as_dict(config),
        "versions": _versions(),
    }
