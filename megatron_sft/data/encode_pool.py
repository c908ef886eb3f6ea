"""Stage 1 of the compiler: records -> encoded conversations in spill files, in worker processes
(or in the calling one), results consumed in input order.

Division of work, chosen so that one reading process keeps 16+ workers busy:

* the parent reads records (JSONL lines stay unparsed bytes), samples the mixture, sends blocks
  of work, and takes back a few numbers per conversation in input order;
* a worker parses, normalises, renders, tokenizes and masks (``ChatMasker``), applies
  ``--overlength``, and appends each kept conversation's tokens and loss mask to its own spill
  files; only (length, offset, counts) travel back.

Before this split the parent also parsed, normalised, pickled conversations out and token arrays
back, staged every conversation, and sent tasks of 16 conversations (~1-2 ms of multiprocessing
overhead each): ~160 us of parent CPU per short chat, against ~1.1 ms of encoding, so the parent
saturated at ~6 workers. Now ~25 us (benchmarks/results/preprocess_scaling.md).

Start-up: workers fork from a fork server that imported transformers (and the torch it imports)
once, instead of each spawned worker importing them (~3 s of CPU each); the caller starts the
fork server before loading its own tokenizer, so both imports overlap. Workers run the tokenizer
with ``TOKENIZERS_PARALLELISM=false`` (unless set): one text per call has nothing to parallelise
(measured: no difference, but no idle rayon pool per worker either).

Spill files (``spill-<pid>.tokens`` int32, ``.mask`` uint8, in the run's temporary folder) are
appended and flushed once per block; a kept conversation is (spill file, token offset, length).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from megatron_sft.data.formats import FormatKeys, RecordError, normalize_record, parse_json_line
from megatron_sft.data.tokenizer_loading import load_tokenizer, resolve_chat_template

# A task costs the parent ~1-2 ms of CPU in multiprocessing's machinery whatever its size, so a
# block carries ~256 KiB of JSONL (~400 short chats, ~0.4 s of work) to keep that below ~5 us per
# conversation. Items of unknown size (parsed payloads, merged conversations) count 4 KiB: 64 a block.
BLOCK_BYTES = 256 << 10
BLOCK_ITEMS = 512
UNKNOWN_ITEM_BYTES = 4 << 10
BLOCKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory: results are consumed in order


@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to encode (picklable; sent once per worker)."""

    tokenizer: str  # a local folder (tokenizer_loading.resolve_tokenizer's result)
    chat_template: str | None  # template text; None: the tokenizer's own
    mode: str
    seq_length: int
    overlength: str  # "drop" | "truncate"
    format_keys: FormatKeys
    spill_dir: str


class Kept(NamedTuple):
    """A conversation written to the spill files."""

    length: int  # tokens stored (after truncation)
    encoded_tokens: int  # tokens of the whole render
    supervised: int
    by_role: dict
    truncated: bool
    offset: int  # first token in the block's spill file
    reasoning_not_rendered: int  # assistant turns whose reasoning the template drops


class Dropped(NamedTuple):
    """A work item that gives no conversation."""

    reason: str
    detail: str
    fix: str  # what to change when the run stops on it ("" -> the --on-error skip hint)
    encoded_tokens: int


class Block(NamedTuple):
    """One task's results, in the order of its work items."""

    spill: str | None  # spill file prefix of this block's Kept results
    results: list
    cpu_s: float  # CPU seconds the encoder spent on the block
    startup_s: float | None  # a worker's start-up, sent with its first block only (None in-process)


class Encoder:
    """One process's masker and spill files. ``tokenizer``: a loaded one (in-process use) or None
    to load ``settings.tokenizer`` (a worker, whose start-up since ``started``, a ``time.time()``,
    goes back with its first block)."""

    def __init__(self, settings: EncodeSettings, tokenizer=None, started: float | None = None):
        from megatron_sft.data.chat_masks import ChatMasker

        started = time.time() if started is None else started
        in_process = tokenizer is not None
        if tokenizer is None:
            tokenizer = load_tokenizer(settings.tokenizer)
        template = settings.chat_template or resolve_chat_template(tokenizer, None)
        self.settings = settings
        self.masker = ChatMasker(tokenizer, chat_template=template, mode=settings.mode)
        self.vocab_size = len(tokenizer)
        self.spill = os.path.join(settings.spill_dir, f"spill-{os.getpid()}")
        self._files = None
        self._num_tokens = 0
        self._startup_s = None if in_process else time.time() - started

    def encode_block(self, work: list[tuple[str, object]]) -> Block:
        """Encode ``work`` items: ("line", JSONL bytes), ("payload", dict) or ("conversation",
        formats.Conversation). Kept conversations are on disk (flushed) when this returns."""
        started = time.thread_time()
        results = [self._encode(kind, value) for kind, value in work]
        if self._files is not None:
            for f in self._files:
                f.flush()
        startup_s, self._startup_s = self._startup_s, None
        return Block(self.spill, results, time.thread_time() - started, startup_s)

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _encode(self, kind: str, value) -> Kept | Dropped:
        from megatron_sft.data.chat_masks import MaskError

        try:
            conversation = value if kind == "conversation" else self._normalize(kind, value)
            encoded = self.masker.encode(conversation.messages, tools=conversation.tools)
        except (RecordError, MaskError) as err:
            return Dropped(err.reason, err.detail, "", 0)
        except Exception as err:  # a template or tokenizer failing in a way the masker did not name
            return Dropped("encode_error", f"{type(err).__name__}: {err}", "", 0)
        return self._store(encoded)

    def _normalize(self, kind: str, value):
        if kind == "line":
            value, error = parse_json_line(value)
            if error is not None:
                raise error
        return normalize_record(value, self.settings.format_keys)

    def _store(self, encoded) -> Kept | Dropped:
        """Apply --overlength, refuse a conversation without supervised tokens, append to the spill."""
        ids, mask = encoded.input_ids, encoded.loss_mask
        full, seq_length = int(ids.size), self.settings.seq_length
        truncated = full > seq_length
        if truncated and self.settings.overlength == "drop":
            return Dropped("too_long", f"{full} tokens > --seq-length {seq_length}", _too_long_fix(full, seq_length), full)
        if truncated:
            ids, mask = ids[:seq_length], mask[:seq_length]
        supervised = int(np.count_nonzero(mask))
        if supervised == 0:
            reason = "too_long" if truncated else "no_supervised_tokens"
            fix = f"raise --seq-length to {full} or more, or {_SKIP}" if truncated else ""
            return Dropped(reason, f"no supervised token in the first {ids.size} tokens", fix, full)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            return Dropped("encode_error", f"token id outside the tokenizer's {self.vocab_size} ids", "", full)
        if self._files is None:
            self._files = (open(self.spill + ".tokens", "ab"), open(self.spill + ".mask", "ab"))
        self._files[0].write(ids.astype(np.int32, copy=False).tobytes())
        self._files[1].write(mask.astype(np.uint8, copy=False).tobytes())
        offset, self._num_tokens = self._num_tokens, self._num_tokens + int(ids.size)
        return Kept(int(ids.size), full, supervised, dict(encoded.supervised_tokens_by_role), truncated, offset,
                    encoded.reasoning_not_rendered)


_SKIP = "--on-error skip to drop it (counted in the report)"


def _too_long_fix(length: int, seq_length: int) -> str:
    return (f"pass --overlength truncate to keep its first {seq_length} tokens, {_SKIP}, "
            f"or --seq-length {length} or more")


def read_spill(spill: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, loss_mask uint8) of one spill file pair, memory-mapped. Plain ndarray views
    (the map stays alive through ``.base``): slicing an ``np.memmap`` costs 6x more."""
    return (np.memmap(spill + ".tokens", dtype=np.int32, mode="r").view(np.ndarray),
            np.memmap(spill + ".mask", dtype=np.uint8, mode="r").view(np.ndarray))


# ---------------------------------------------------------------- worker processes


_ENCODER: Encoder | None = None
_STARTUP_ERROR: str | None = None


def _init_worker(settings: EncodeSettings, started: float) -> None:
    # A raising initializer makes multiprocessing restart the worker forever (and print a
    # traceback each time): keep the error and report it with the first task instead.
    global _ENCODER, _STARTUP_ERROR
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _ENCODER = Encoder(settings, started=started)
    except Exception as err:
        _STARTUP_ERROR = f"{type(err).__name__}: {err}"


def _encode_block(work: list) -> Block:
    if _ENCODER is None:
        raise RuntimeError(f"an encoding worker could not start: {_STARTUP_ERROR}")
    return _ENCODER.encode_block(work)


def _context():
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Imported once in the fork server (no effect once it runs); workers fork with them loaded.
    context.set_forkserver_preload([__name__, "megatron_sft.data.chat_masks", "transformers",
                                    "transformers.models.auto.tokenization_auto"])
    return context


def start_fork_server() -> None:
    """Start the fork server now; it returns at once and imports in the background, so a pool made
    later forks workers that have transformers loaded already."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class EncodePool:
    """``workers`` encoding processes; starting them returns at once (they load in the background).
    Use as a context manager, or call ``close``."""

    def __init__(self, settings: EncodeSettings, workers: int):
        self.workers = workers
        self._pool = _context().Pool(workers, initializer=_init_worker, initargs=(settings, time.time()))

    def submit(self, work: list):
        return self._pool.apply_async(_encode_block, (work,))

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def blocks(items: Iterable) -> Iterator[list]:
    """Group items (each with ``work`` set, or None for a record already known bad) into blocks
    of about BLOCK_BYTES of input, at most BLOCK_ITEMS items."""
    block, size = [], 0
    for item in items:
        block.append(item)
        if item.work is not None:
            size += len(item.work[1]) if item.work[0] == "line" else UNKNOWN_ITEM_BYTES
        if len(block) == BLOCK_ITEMS or size >= BLOCK_BYTES:
            yield block
            block, size = [], 0
    if block:
        yield block


class Clock:
    """Seconds the parent spent waiting for workers, and what the workers reported."""

    def __init__(self):
        self.wait_s = 0.0
        self.workers_cpu_s = 0.0
        self.worker_startup_s: list[float] = []

    def saw(self, block: Block) -> None:
        self.workers_cpu_s += block.cpu_s
        if block.startup_s is not None:
            self.worker_startup_s.append(block.startup_s)


def encode_in_order(item_blocks: Iterable[list], encode: Encoder | EncodePool, clock: Clock) -> Iterator[tuple[list, Block | None]]:
    """(block of items, its Block) in input order; the Block is None when no item had work.

    With an Encoder the blocks run here; with an EncodePool up to BLOCKS_IN_FLIGHT_PER_WORKER per
    worker are in flight and results are taken in submission order."""
    def work_of(block):
        return [item.work for item in block if item.work is not None]

    if isinstance(encode, Encoder):
        for block in item_blocks:
            work = work_of(block)
            result = encode.encode_block(work) if work else None
            if result is not None:
                clock.saw(result)
            yield block, result
        return
    pending: deque = deque()

    def take():
        block, future = pending.popleft()
        if future is None:
            return block, None
        started = time.perf_counter()
        result = future.get()
        clock.wait_s += time.perf_counter() - started
        clock.saw(result)
        return block, result

    for block in item_blocks:
        work = work_of(block)
        pending.append((block, encode.submit(work) if work else None))
        if len(pending) >= BLOCKS_IN_FLIGHT_PER_WORKER * encode.workers:
            yield take()
    while pending:
        yield take()
