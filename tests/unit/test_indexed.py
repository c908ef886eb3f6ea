"""Writer -> PackedDataset round trip, and the errors on missing or inconsistent files."""

from __future__ import annotations

import gc
import json
import os
import pickle

import numpy as np
import pytest

from megatron_sft.data import PackedDataset
from megatron_sft.data.indexed import (
    ConversationStore,
    PackedWriter,
    meta_path,
    output_paths,
    part_prefix,
    report_path,
)

PACKS = [
    # (tokens per conversation, masks per conversation, source_index, record_index)
    ([[5, 6, 7], [8, 9]], [[0, 1, 1], [0, 1]], [0, 1], [10, 4]),
    ([[1, 2, 3, 4]], [[0, 0, 1, 1]], [1], [0]),
    ([[11], [12, 13], [14]], [[1], [0, 1], [0]], [0, 0, 2], [1, 2, 99]),
]


def _write(prefix, packs=PACKS, seq_length=8):
    writer = PackedWriter(prefix)
    for tokens, masks, source, record in packs:
        writer.add_pack(
            [np.array(t, dtype=np.int32) for t in tokens],
            [np.array(m, dtype=np.uint8) for m in masks],
            source,
            record,
        )
    writer.finalize()
    counts = {"num_packs": writer.num_packs, "num_conversations": writer.num_conversations, "num_tokens": writer.num_tokens}
    with open(meta_path(prefix), "w") as f:
        json.dump({"seq_length": seq_length, "counts": counts}, f)
    with open(report_path(prefix), "w") as f:
        json.dump({}, f)
    return counts


def _edit_meta(prefix, edit) -> dict:
    """Apply ``edit(meta)`` to PREFIX.meta.json in place; returns the edited meta."""
    meta = json.loads(open(meta_path(prefix)).read())
    edit(meta)
    open(meta_path(prefix), "w").write(json.dumps(meta))
    return meta


def test_round_trip_exact(tmp_path):
    prefix = tmp_path / "set"
    counts = _write(prefix)
    assert counts == {"num_packs": 3, "num_conversations": 6, "num_tokens": 13}
    ds = PackedDataset(prefix)
    assert len(ds) == 3 and ds.num_tokens == 13 and ds.meta["seq_length"] == 8
    for i, (tokens, masks, source, record) in enumerate(PACKS):
        item = ds[i]
        assert item["tokens"].dtype == np.int32 and item["loss_mask"].dtype == np.uint8
        assert item["cu_seqlens"].dtype == np.int32
        assert item["source_index"].dtype == np.int64 and item["record_index"].dtype == np.int64
        assert item["tokens"].tolist() == sum(tokens, [])
        assert item["loss_mask"].tolist() == sum(masks, [])
        assert item["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).tolist()
        assert item["source_index"].tolist() == source
        assert item["record_index"].tolist() == record
    assert ds[-1]["tokens"].tolist() == [11, 12, 13, 14]
    with pytest.raises(IndexError):
        ds[3]


def test_items_are_copies_that_outlive_the_dataset(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    ds = PackedDataset(prefix)
    item = ds[0]
    assert all(array.base is None for array in item.values())  # fresh arrays, not mmap views
    del ds
    gc.collect()
    # Views into a closed mmap would segfault here.
    assert item["tokens"].sum() == 35 and item["loss_mask"].sum() == 3


def test_pickle_reopens(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    ds = pickle.loads(pickle.dumps(PackedDataset(prefix)))
    assert ds[2]["record_index"].tolist() == [1, 2, 99]


def test_missing_file_named(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    os.remove(part_prefix(prefix, "loss_mask") + ".idx")
    with pytest.raises(FileNotFoundError, match="set_loss_mask.idx"):
        PackedDataset(prefix)


def test_missing_meta_named(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    os.remove(meta_path(prefix))
    with pytest.raises(FileNotFoundError, match=r"set\.meta\.json"):
        PackedDataset(prefix)


def test_parts_disagree(tmp_path):
    prefix, other = tmp_path / "set", tmp_path / "other"
    _write(prefix)
    changed = [PACKS[0], ([[1, 2, 3]], [[0, 0, 1]], [1], [0]), PACKS[2]]
    _write(other, changed)
    os.replace(part_prefix(other, "loss_mask") + ".bin", part_prefix(prefix, "loss_mask") + ".bin")
    os.replace(part_prefix(other, "loss_mask") + ".idx", part_prefix(prefix, "loss_mask") + ".idx")
    with pytest.raises(ValueError, match=f"{prefix}.*sequence lengths differ"):
        PackedDataset(prefix)


def test_meta_counts_disagree(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    _edit_meta(prefix, lambda meta: meta["counts"].update(num_packs=4))
    with pytest.raises(ValueError, match="num_packs=4"):
        PackedDataset(prefix)


def test_truncated_bin(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    path = part_prefix(prefix, "tokens") + ".bin"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(ValueError, match="set_tokens.bin has 48 bytes"):
        PackedDataset(prefix)


def test_corrupt_idx_header(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    with open(part_prefix(prefix, "provenance") + ".idx", "r+b") as f:
        f.write(b"garbage!!")
    with pytest.raises(ValueError, match="set_provenance.idx is not a Megatron index file"):
        PackedDataset(prefix)


def test_pack_over_seq_length(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix, seq_length=4)
    with pytest.raises(ValueError, match="5 tokens > seq_length 4"):
        PackedDataset(prefix)


def test_writer_rejects_out_of_range_values(tmp_path):
    writer = PackedWriter(tmp_path / "set")
    with pytest.raises(ValueError, match="loss_mask value 2"):
        writer.add_pack([np.array([1, 2])], [np.array([0, 2])], [0], [0])
    with pytest.raises(ValueError, match="token id value -1"):
        writer.add_pack([np.array([1, -1])], [np.array([0, 1])], [0], [0])
    with pytest.raises(ValueError, match="disagree"):
        writer.add_pack([np.array([1, 2])], [np.array([0])], [0], [0])
    store = ConversationStore(tmp_path / "stage", vocab_size=10)
    with pytest.raises(ValueError, match="token id value 10"):
        store.add(np.array([3, 10]), np.array([0, 1]))
    with pytest.raises(ValueError, match="loss_mask value 300"):
        store.add(np.array([3, 4]), np.array([0, 300]))


def test_conversation_store_round_trip(tmp_path):
    store = ConversationStore(tmp_path / "stage", vocab_size=100)
    assert store.add(np.array([1, 2, 3], dtype=np.int32), np.array([0, 1, 1], dtype=np.uint8)) == 0
    assert store.add(np.array([4], dtype=np.int32), np.array([1], dtype=np.uint8)) == 1
    store.finalize()
    tokens, masks = store.reader()
    assert tokens.sequence_lengths.tolist() == [3, 1]
    assert tokens[0].tolist() == [1, 2, 3] and masks[0].tolist() == [0, 1, 1]
    assert tokens[1].tolist() == [4] and masks[1].tolist() == [1]


def test_output_paths_names(tmp_path):
    names = [os.path.basename(p) for p in output_paths(tmp_path / "d")]
    assert names == [
        "d_tokens.bin", "d_tokens.idx", "d_loss_mask.bin", "d_loss_mask.idx",
        "d_provenance.bin", "d_provenance.idx", "d.report.json", "d.meta.json",
    ]


# ---------------------------------------------------------------- integrity at open (issue 8, class 5)


def _items(ds):
    return [{k: v.tolist() for k, v in ds[i].items()} for i in range(len(ds))]


@pytest.mark.parametrize("part, every_bit", [("tokens", True), ("loss_mask", False), ("provenance", False)])
def test_every_bit_flip_in_an_index_is_caught_or_harmless(tmp_path, part, every_bit):
    """Flip bits of one .idx in turn: opening either raises a ValueError naming the file and the
    fix, or reads back exactly the original packs (no shifted pack, no raw IndexError later).
    Every bit of the tokens index; one seeded bit per byte of the others (an open costs ~3 ms)."""
    prefix = tmp_path / "set"
    _write(prefix)
    expected = _items(PackedDataset(prefix))
    path = part_prefix(prefix, part) + ".idx"
    original = open(path, "rb").read()
    rng = np.random.default_rng(0)
    bits = range(len(original) * 8) if every_bit else [8 * i + int(rng.integers(8)) for i in range(len(original))]
    num_caught = 0
    for bit in bits:
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        open(path, "wb").write(bytes(flipped))
        try:
            ds = PackedDataset(prefix)
        except ValueError as err:
            assert os.path.basename(path) in str(err) and "re-run tools/preprocess_data.py" in str(err), (bit, err)
            num_caught += 1
            continue
        assert _items(ds) == expected, f"bit {bit} of {path} changed the data silently"
    assert num_caught == len(bits)  # no bit of a Megatron index is unused: every flip is caught


def test_shifted_pointer_names_pack_and_conversation(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    path = part_prefix(prefix, "tokens") + ".idx"
    data = bytearray(open(path, "rb").read())
    # Header 34 bytes, 6 int32 lengths, then int64 pointers [0, 12, 20, ...]: sequence 2 = pack 1, conv 0.
    pointer_2 = 34 + 6 * 4 + 2 * 8
    data[pointer_2] ^= 0x04  # 20 -> 16 bytes: one int32 token earlier
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"set_tokens\.idx: sequence pointer 16 at pack 1, conversation 0 should be 20"):
        PackedDataset(prefix)


def test_values_checked_against_vocab_and_inputs(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    _edit_meta(prefix, lambda meta: meta.update(vocab_size=14, settings={"inputs": ["a.jsonl", "b.jsonl"]}))
    with pytest.raises(ValueError) as info:
        PackedDataset(prefix)
    message = str(info.value)
    assert "set_tokens.bin: token id 14 outside [0, 14) (the tokenizer's vocab_size in the meta) at pack 2, conversation 2" in message
    assert "set_provenance.bin: source_index 2 outside [0, 2) (the number of inputs) at pack 2, conversation 2" in message
    _edit_meta(prefix, lambda meta: meta.update(vocab_size=15, settings={"inputs": ["a", "b", "c"]}))
    assert len(PackedDataset(prefix)) == 3


def test_loss_mask_value_not_0_or_1(tmp_path):
    prefix = tmp_path / "set"
    _write(prefix)
    with open(part_prefix(prefix, "loss_mask") + ".bin", "r+b") as f:
        f.seek(5)  # pack 1's first token
        f.write(b"\x03")
    with pytest.raises(ValueError, match=r"loss_mask value 3 \(not 0/1\) at pack 1, conversation 0"):
        PackedDataset(prefix)
