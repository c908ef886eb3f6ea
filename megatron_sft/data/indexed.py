"""The packed file set (Megatron ``IndexedDataset`` files) and its reader, ``PackedDataset``.

Files under one ``PREFIX`` (see DESIGN.md, "Data contract"):

- ``PREFIX_tokens.bin/.idx``      int32 token ids;
- ``PREFIX_loss_mask.bin/.idx``   uint8, ``loss_mask[j] == 1`` iff ``tokens[j]`` is a supervised
  target;
- ``PREFIX_provenance.bin/.idx``  int64, one sequence ``(source_index, record_index)`` per
  conversation; ``record_index`` counts records over all inputs in ``--input`` order (global,
  not per file), as ``readers.iter_records`` numbers them;
- ``PREFIX.meta.json``, ``PREFIX.report.json``.

In all three indexed datasets one *document* is one pack (a training sequence) and one
*sequence* is one conversation, so the token file's ``sequence_lengths`` inside a document give
its cu_seqlens. Only real lengths are stored: padding for CP/TP is done when batches are built.

Megatron's builder wraps out-of-range values silently (a 300 in a uint8 file reads back as 44)
and its reader returns views into an mmap that segfault once the dataset is collected, so the
writer range-checks every array and the reader returns copies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import megatron_sft.mcore  # noqa: F401  (must precede megatron.core imports)
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_sft.data.integrity import FIX, check_file_set, check_index_header
from megatron_sft.data.output_files import (PART_NAMES, indexed_paths, meta_path, output_paths,  # noqa: F401
                                            part_prefix, report_path)
from megatron_sft.errors import InputError, MissingInputError

FORMAT_VERSION = 1
TOKENS_DTYPE = np.int32
LOSS_MASK_DTYPE = np.uint8
PROVENANCE_DTYPE = np.int64
PROVENANCE_WIDTH = 2  # (source_index, record_index)

_INDEXED_PARTS = {"tokens": TOKENS_DTYPE, "loss_mask": LOSS_MASK_DTYPE, "provenance": PROVENANCE_DTYPE}
assert tuple(_INDEXED_PARTS) == PART_NAMES


def check_range(values: np.ndarray, low: int, high: int, what: str) -> None:
    """Raise ValueError unless every value is in [low, high) (a builder would wrap silently)."""
    if values.size and (values.min() < low or values.max() >= high):
        bad = values[(values < low) | (values >= high)][0]
        raise ValueError(f"{what} value {int(bad)} outside [{low}, {high})")


class ConversationStore:
    """Staging area: encoded conversations appended one per document, unpacked.

    Keeps only the lengths in memory; ``reader()`` then maps the files for random access while
    packs are written.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None):
        self._prefix = os.fspath(prefix)
        self._vocab_size = vocab_size if vocab_size is not None else np.iinfo(TOKENS_DTYPE).max
        self._tokens = IndexedDatasetBuilder(part_prefix(self._prefix, "tokens") + ".bin", dtype=TOKENS_DTYPE)
        self._mask = IndexedDatasetBuilder(part_prefix(self._prefix, "loss_mask") + ".bin", dtype=LOSS_MASK_DTYPE)
        self.num_conversations = 0

    def add(self, input_ids: np.ndarray, loss_mask: np.ndarray) -> int:
        """Append one conversation; returns its index in the store."""
        if input_ids.shape != loss_mask.shape or input_ids.ndim != 1 or input_ids.size == 0:
            raise ValueError(
                f"input_ids {input_ids.shape} and loss_mask {loss_mask.shape} must be equal non-empty 1-D"
            )
        check_range(input_ids, 0, self._vocab_size, "token id")
        check_range(loss_mask, 0, 2, "loss_mask")
        self._tokens.add_document(input_ids.astype(TOKENS_DTYPE, copy=False), [input_ids.size])
        self._mask.add_document(loss_mask.astype(LOSS_MASK_DTYPE, copy=False), [loss_mask.size])
        self.num_conversations += 1
        return self.num_conversations - 1

    def finalize(self) -> None:
        self._tokens.finalize(part_prefix(self._prefix, "tokens") + ".idx")
        self._mask.finalize(part_prefix(self._prefix, "loss_mask") + ".idx")

    def reader(self) -> tuple[IndexedDataset, IndexedDataset]:
        """(tokens, loss_mask) datasets over the finalized store; item i = conversation i."""
        return (
            IndexedDataset(part_prefix(self._prefix, "tokens")),
            IndexedDataset(part_prefix(self._prefix, "loss_mask")),
        )


class PackedWriter:
    """Writes packs into the three indexed parts under ``prefix``.

    ``add_pack`` takes the conversations of one pack in order; ``finalize`` writes the indexes.
    """

    def __init__(self, prefix: str | os.PathLike):
        self._prefix = os.fspath(prefix)
        self._builders = {
            part: IndexedDatasetBuilder(part_prefix(self._prefix, part) + ".bin", dtype=dtype)
            for part, dtype in _INDEXED_PARTS.items()
        }
        self.num_packs = 0
        self.num_conversations = 0
        self.num_tokens = 0

    def add_pack(
        self,
        tokens: list[np.ndarray],
        loss_masks: list[np.ndarray],
        source_index: list[int] | np.ndarray,
        record_index: list[int] | np.ndarray,
    ) -> None:
        lengths = [int(t.size) for t in tokens]
        if not lengths or min(lengths) < 1:
            raise ValueError("a pack needs at least one non-empty conversation")
        if [int(m.size) for m in loss_masks] != lengths or len(source_index) != len(lengths) or len(record_index) != len(lengths):
            raise ValueError("tokens, loss_masks, source_index and record_index disagree in length")
        flat_tokens = np.concatenate(tokens)
        flat_mask = np.concatenate(loss_masks)
        check_range(flat_tokens, 0, np.iinfo(TOKENS_DTYPE).max, "token id")
        check_range(flat_mask, 0, 2, "loss_mask")
        provenance = np.stack(
            [np.asarray(source_index, dtype=PROVENANCE_DTYPE), np.asarray(record_index, dtype=PROVENANCE_DTYPE)],
            axis=1,
        ).reshape(-1)
        self._builders["tokens"].add_document(flat_tokens.astype(TOKENS_DTYPE, copy=False), lengths)
        self._builders["loss_mask"].add_document(flat_mask.astype(LOSS_MASK_DTYPE, copy=False), lengths)
        self._builders["provenance"].add_document(provenance, [PROVENANCE_WIDTH] * len(lengths))
        self.num_packs += 1
        self.num_conversations += len(lengths)
        self.num_tokens += int(flat_tokens.size)

    def finalize(self) -> None:
        for part, builder in self._builders.items():
            builder.finalize(part_prefix(self._prefix, part) + ".idx")


def _open_part(prefix: str, part: str) -> IndexedDataset:
    """Open one indexed part once its header and size are known good (``integrity``), turning
    whatever Megatron's reader still raises into ValueError naming the file."""
    path = part_prefix(prefix, part)
    check_index_header(path + ".idx", _INDEXED_PARTS[part])
    try:
        return IndexedDataset(path)
    except (AssertionError, ValueError, OSError) as err:
        raise InputError(f"packed dataset {prefix}: cannot read {path}.idx/.bin: {err or type(err).__name__}; {FIX}") from err


class PackedDataset:
    """Reader of a packed file set; item i is pack i.

    ``dataset[i]`` -> dict of fresh arrays (never views into the mmap):
        tokens        int32 [n]       the pack's real tokens (no padding), n <= seq_length
        loss_mask     uint8 [n]       1 iff tokens[j] is a supervised target
        cu_seqlens    int32 [c + 1]   conversation boundaries, 0 ... n
        source_index  int64 [c]       input file of each conversation (position in ``--input``)
        record_index  int64 [c]       its record number over all inputs concatenated in --input
                                      order (global, not per file: file 0's records first),
                                      non-blank JSONL lines / list items / rows counted from 0

    Opening validates the set (``integrity``: index pointers against the lengths, pack
    boundaries, file sizes, loss-mask and token values, provenance; then the meta's counts and
    seq_length): a missing file raises FileNotFoundError naming it; anything inconsistent one
    ValueError naming the files, the pack and the fix.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        for path in output_paths(self.prefix):
            if path != report_path(self.prefix) and not os.path.exists(path):
                raise MissingInputError(f"packed dataset {self.prefix}: missing file {path}")
        try:
            self.meta = json.loads(Path(meta_path(self.prefix)).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"packed dataset {self.prefix}: unreadable {meta_path(self.prefix)}: {err}") from err
        self._tokens = _open_part(self.prefix, "tokens")
        self._loss_mask = _open_part(self.prefix, "loss_mask")
        self._provenance = _open_part(self.prefix, "provenance")
        self._validate()
        self._doc_index = np.array(self._tokens.document_indices, dtype=np.int64)
        self._lengths = np.array(self._tokens.sequence_lengths, dtype=np.int64)
        self.num_tokens = int(self._lengths.sum())

    def _validate(self) -> None:
        """Structure and values (``integrity.check_file_set``), then the meta's counts and seq_length."""
        parts = {"tokens": self._tokens, "loss_mask": self._loss_mask, "provenance": self._provenance}
        check_file_set(self.prefix, {part: part_prefix(self.prefix, part) for part in parts}, parts, self.meta,
                       PROVENANCE_WIDTH)
        tok = self._tokens
        problems = []
        counts = self.meta.get("counts", {})
        for key, actual in (
            ("num_packs", len(tok.document_indices) - 1),
            ("num_conversations", len(tok)),
            ("num_tokens", int(np.asarray(tok.sequence_lengths, dtype=np.int64).sum())),
        ):
            if key in counts and counts[key] != actual:
                problems.append(f"meta says {key}={counts[key]}, files hold {actual}")
        seq_length = self.meta.get("seq_length")
        if seq_length is not None and len(tok):
            pack_tokens = np.add.reduceat(np.asarray(tok.sequence_lengths, dtype=np.int64), tok.document_indices[:-1])
            if pack_tokens.max() > seq_length:
                problems.append(f"pack {int(pack_tokens.argmax())} holds {int(pack_tokens.max())} tokens > "
                                f"seq_length {seq_length}")
        if problems:
            raise InputError(f"packed dataset {self.prefix} is inconsistent with {meta_path(self.prefix)}: "
                             + "; ".join(problems) + f"; {FIX}")

    def __len__(self) -> int:
        return len(self._doc_index) - 1

    @property
    def conversation_lengths(self) -> np.ndarray:
        """int64 [num_conversations]: real tokens per conversation, in file order (a copy)."""
        return self._lengths.copy()

    def max_padded_pack_length(self, multiple: int) -> int:
        """Longest pack once each of its conversations is padded to a multiple of ``multiple``."""
        if len(self) == 0:
            return 0
        padded = -(-self._lengths // multiple) * multiple
        return int(np.add.reduceat(padded, self._doc_index[:-1]).max())

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"pack {idx} out of range for {len(self)} packs")
        idx = int(idx) % len(self)
        first, last = int(self._doc_index[idx]), int(self._doc_index[idx + 1])
        lengths = self._lengths[first:last]
        cu_seqlens = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        provenance = self._read(self._provenance, first, PROVENANCE_WIDTH * (last - first)).reshape(-1, PROVENANCE_WIDTH)
        return {
            "tokens": self._read(self._tokens, first, int(cu_seqlens[-1])),
            "loss_mask": self._read(self._loss_mask, first, int(cu_seqlens[-1])),
            "cu_seqlens": cu_seqlens,
            "source_index": np.array(provenance[:, 0], dtype=np.int64),
            "record_index": np.array(provenance[:, 1], dtype=np.int64),
        }

    @staticmethod
    def _read(dataset: IndexedDataset, first: int, count: int) -> np.ndarray:
        # Sequences of one document are contiguous in the .bin: one read, then copy off the mmap.
        view = dataset.bin_reader.read(dtype=dataset.index.dtype, count=count, offset=int(dataset.index.sequence_pointers[first]))
        return np.array(view, copy=True)

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.__init__(state["prefix"])
