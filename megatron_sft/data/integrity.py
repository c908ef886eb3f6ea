"""Checks a packed file set before anything trains on it: every inconsistency is one ValueError
naming the file, the pack (and conversation) where it was found, and the fix.

Megatron's reader trusts the ``.idx`` file: its sequence pointers are byte offsets into the
``.bin`` used as is, so one flipped bit in a pointer shifts a pack by a token and trains silently,
and a flipped count or document index raises a raw ``IndexError`` on first use. Here, before
``IndexedDataset`` maps a part:

* the header: magic, version 1, dtype code of that part, and the ``.idx`` size exactly
  ``34 + 12 * sequences + 8 * documents`` bytes (a flipped count cannot go unnoticed);

and once it is mapped, vectorised over the index arrays (no Python loop per conversation):

* every sequence length >= 1 and every pointer equal to the cumulative sum of the lengths
  before it times the dtype size, e.g. lengths ``[3, 2, 4]`` of int32 -> pointers ``[0, 12, 20]``;
* document (pack) indices starting at 0, strictly increasing (no empty pack), ending at the
  sequence count; the ``.bin`` exactly ``sum(lengths) * itemsize`` bytes;
* across the parts: the same lengths for tokens and loss mask, the same pack boundaries for all
  three, one ``(source_index, record_index)`` per conversation;
* the values, one pass over each ``.bin`` mmap: loss mask in {0, 1}; token ids in
  ``[0, vocab_size)`` when the meta gives a vocab size; ``source_index`` in
  ``[0, number of inputs)`` and ``record_index >= 0``.

Cost (measured, ``benchmarks/results/dataset_open.md``): the value pass dominates, a few tens of ms
per 100 MB of tokens from the page cache.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from megatron_sft.errors import InputError

FIX = "the file set is damaged or was modified after preprocessing: re-run tools/preprocess_data.py to rewrite it"
_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# Megatron's DType codes (megatron.core.datasets.indexed_dataset.DType).
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}


class _Problems(list):
    """Problems of one file set, each ``path: what [at pack P]``; raised together."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def raise_if_any(self) -> None:
        if self:
            lines = "\n  ".join(self)
            raise InputError(f"packed dataset {self.prefix} is corrupt:\n  {lines}\n{FIX}")


def check_index_header(path: str, dtype) -> None:
    """ValueError unless ``path`` (an ``.idx``) is a version-1 Megatron index of ``dtype`` whose size
    matches the counts in its header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _HEADER:
        raise InputError(f"{path} is not a Megatron index file (bad header); {FIX}")
    version, code, num_sequences, num_documents = struct.unpack("<QBQQ", head[9:])
    problem = None
    if version != 1:
        problem = f"index version {version}, expected 1"
    elif _DTYPE_CODES.get(code) is not np.dtype(dtype).type:
        found = np.dtype(_DTYPE_CODES[code]).name if code in _DTYPE_CODES else f"unknown code {code}"
        problem = f"holds {found}, expected {np.dtype(dtype).name}"
    else:
        expected = _HEADER_BYTES + 12 * num_sequences + 8 * num_documents
        if size != expected:
            problem = (f"is {size} bytes but its header ({num_sequences} conversations, {num_documents - 1} packs) "
                       f"needs {expected}")
    if problem:
        raise InputError(f"{path} {problem}; {FIX}")


def _locate(doc_index: np.ndarray, sequence: int) -> str:
    """``pack P, conversation C`` of global sequence (conversation) number ``sequence``."""
    pack = int(np.searchsorted(doc_index, sequence, side="right")) - 1
    return f"pack {pack}, conversation {sequence - int(doc_index[pack])}" if 0 <= pack < len(doc_index) - 1 \
        else f"conversation {sequence}"


def check_part_layout(problems: _Problems, path: str, lengths: np.ndarray, pointers: np.ndarray,
                      doc_index: np.ndarray, itemsize: int) -> bool:
    """Lengths, pointers, pack boundaries and .bin size of one part; False when any is wrong."""
    before = len(problems)
    num = len(lengths)
    if len(doc_index) == 0 or doc_index[0] != 0 or doc_index[-1] != num:
        first_last = (int(doc_index[0]), int(doc_index[-1])) if len(doc_index) else None
        problems.append(f"{path}.idx: pack boundaries {first_last} must run from 0 to {num} conversations")
    elif len(doc_index) > 1 and not np.all(np.diff(doc_index) > 0):
        bad = int(np.argmax(np.diff(doc_index) <= 0))
        problems.append(f"{path}.idx: pack {bad} has {int(doc_index[bad + 1] - doc_index[bad])} conversations")
    if num and lengths.min() < 1:
        problems.append(f"{path}.idx: length {int(lengths.min())} at {_locate(doc_index, int(np.argmin(lengths)))}")
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    expected = np.concatenate([[0], ends[:-1]]) if num else ends
    wrong = np.flatnonzero(pointers != expected)
    if wrong.size:
        i = int(wrong[0])
        problems.append(f"{path}.idx: sequence pointer {int(pointers[i])} at {_locate(doc_index, i)} "
                        f"should be {int(expected[i])} (the lengths before it x {itemsize} bytes); "
                        f"{wrong.size} pointer(s) wrong")
    total = int(ends[-1]) if num else 0
    actual = os.path.getsize(path + ".bin")
    if actual != total:
        problems.append(f"{path}.bin has {actual} bytes, its index describes {total} ({os.path.basename(path)}.idx)")
    return len(problems) == before


def check_parts_agree(problems: _Problems, paths: dict, parts: dict, provenance_width: int) -> bool:
    """The parts describe the same packs and conversations; False when they do not."""
    before = len(problems)
    tok, mask, prov = parts["tokens"].index, parts["loss_mask"].index, parts["provenance"].index
    if not np.array_equal(tok.sequence_lengths, mask.sequence_lengths):
        where = ""
        if len(tok.sequence_lengths) == len(mask.sequence_lengths):
            i = int(np.argmax(tok.sequence_lengths != mask.sequence_lengths))
            where = f" first at {_locate(tok.document_indices, i)}"
        problems.append(f"{paths['tokens']}.idx and {paths['loss_mask']}.idx: sequence lengths differ{where}")
    for part in ("loss_mask", "provenance"):
        if not np.array_equal(tok.document_indices, parts[part].index.document_indices):
            problems.append(f"{paths['tokens']}.idx and {paths[part]}.idx disagree on pack boundaries")
    if len(prov.sequence_lengths) != len(tok.sequence_lengths) or not np.all(prov.sequence_lengths == provenance_width):
        problems.append(f"{paths['provenance']}.idx must hold one ({provenance_width},) entry per conversation "
                        f"({len(tok.sequence_lengths)} conversations)")
    return len(problems) == before


def _values(dataset) -> np.ndarray:
    """The whole .bin of a part as a flat array over its mmap (no copy)."""
    index = dataset.index
    count = int(np.sum(index.sequence_lengths, dtype=np.int64))
    return dataset.bin_reader.read(dtype=index.dtype, count=count, offset=0) if count else np.empty(0, index.dtype)


def _first_outside(values: np.ndarray, low: int, high: int | None) -> int | None:
    """Position of the first value outside [low, high) (high None: no upper bound), or None."""
    if values.size == 0 or (values.min() >= low and (high is None or values.max() < high)):
        return None
    bad = values < low if high is None else (values < low) | (values >= high)
    return int(np.argmax(bad))


def check_values(problems: _Problems, paths: dict, parts: dict, vocab_size: int | None,
                 num_sources: int | None) -> None:
    """Loss mask in {0, 1}, token ids in [0, vocab_size), provenance within the inputs."""
    index = parts["tokens"].index
    starts = np.cumsum(index.sequence_lengths, dtype=np.int64)

    def where(position: int) -> str:
        return _locate(index.document_indices, int(np.searchsorted(starts, position, side="right")))

    mask = _values(parts["loss_mask"])
    bad = _first_outside(mask, 0, 2)
    if bad is not None:
        problems.append(f"{paths['loss_mask']}.bin: loss_mask value {int(mask[bad])} (not 0/1) at {where(bad)}")
    tokens = _values(parts["tokens"])
    bad = _first_outside(tokens, 0, vocab_size)
    if bad is not None:
        limit = f"[0, {vocab_size}) (the tokenizer's vocab_size in the meta)" if vocab_size else ">= 0"
        problems.append(f"{paths['tokens']}.bin: token id {int(tokens[bad])} outside {limit} at {where(bad)}")
    provenance = _values(parts["provenance"]).reshape(-1, 2)
    for column, name, high in ((0, "source_index", num_sources), (1, "record_index", None)):
        bad = _first_outside(provenance[:, column], 0, high)
        if bad is not None:
            limit = f"[0, {high}) (the number of inputs)" if high else ">= 0"
            problems.append(f"{paths['provenance']}.bin: {name} {int(provenance[bad, column])} outside {limit} "
                            f"at {_locate(index.document_indices, bad)}")


def check_file_set(prefix: str, paths: dict, parts: dict, meta: dict, provenance_width: int) -> None:
    """Every check of the module docstring on the opened parts (``{part: IndexedDataset}``, their
    path prefixes in ``paths``); one ValueError listing all problems found."""
    problems = _Problems(prefix)
    layouts_ok = all([
        check_part_layout(problems, paths[part], ds.index.sequence_lengths, ds.index.sequence_pointers,
                          ds.index.document_indices, np.dtype(ds.index.dtype).itemsize)
        for part, ds in parts.items()
    ])
    if layouts_ok and check_parts_agree(problems, paths, parts, provenance_width):
        inputs = (meta.get("settings") or {}).get("inputs")
        check_values(problems, paths, parts, meta.get("vocab_size"), len(inputs) if inputs else None)
    problems.raise_if_any()
