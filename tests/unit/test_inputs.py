"""Fixed-length micro-batches for interleaved pipelines: the length fits every micro-batch the
data can form for the layout (CP / SP padding included) and is a multiple of the layout's total."""

from __future__ import annotations

import itertools

import pytest

from megatron_sft.config import DataConfig, ModelConfig, ParallelConfig, SFTConfig, TrainingConfig
from megatron_sft.data import PackedDataset
from megatron_sft.data.batches import padding_multiples
from megatron_sft.training.inputs import BatchBuilder, eval_micro_batches, fixed_micro_batch_length
from tests.integration.trainer_helpers import conversations, write_packed


def _cfg(parallel: ParallelConfig, micro_batch_size: int) -> SFTConfig:
    return SFTConfig(model=ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                       vocab_size=128, max_position_embeddings=512),
                     data=DataConfig(train_prefix="unused", seq_length=256),
                     training=TrainingConfig(global_batch_size=4, train_steps=1, micro_batch_size=micro_batch_size),
                     parallel=parallel)


def test_no_fixed_length_without_virtual_pipeline(tmp_path):
    ds = PackedDataset(write_packed(tmp_path / "d", conversations(10, seed=0), seq_length=256))
    assert fixed_micro_batch_length([ds], _cfg(ParallelConfig(pipeline_model_parallel_size=2), 1)) is None


@pytest.mark.parametrize("cp, tp, sp, mbs", [(1, 1, False, 1), (2, 1, False, 1), (4, 1, False, 2), (1, 2, True, 1),
                                             (2, 2, True, 2)])
def test_fixed_length_fits_every_micro_batch(tmp_path, cp, tp, sp, mbs):
    # many short conversations per pack: per-conversation padding adds up
    ds = PackedDataset(write_packed(tmp_path / "d", conversations(60, seed=1, min_len=5, max_len=30), seq_length=256))
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2, context_parallel_size=cp, sequence_parallel=sp)
    cfg = _cfg(parallel, mbs)
    length = fixed_micro_batch_length([ds], cfg)
    _, total_multiple = padding_multiples(cp, tp, sp)
    assert length % total_multiple == 0 and length >= mbs * max(len(ds[i]["tokens"]) for i in range(len(ds)))
    builder = BatchBuilder([ds], [0], cfg, cp_rank=0, pad_to_length=length)
    sizes = set()
    for group in itertools.combinations(range(len(ds)), mbs):
        batch = builder.micro_batch([(0, i) for i in group])
        sizes.add(batch.tokens.numel())
    assert sizes == {length // cp}  # every CP rank holds length / CP tokens, whatever the packs


def test_tokenizers_must_agree_across_train_valid_and_pretrained(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    import dataclasses
    import json
    import shutil

    from megatron_sft.config import CheckpointConfig
    from megatron_sft.data.tokenizer_identity import HASH_KEY, vocab_sha256
    from megatron_sft.training.inputs import DataError, check_tokenizers

    def dataset(name, digest):
        prefix = write_packed(tmp_path / name, conversations(4, seed=0), seq_length=256)
        meta = json.loads(open(prefix + ".meta.json").read())
        meta.update({HASH_KEY: digest, "vocab_size": len(tiny_tokenizer), "tokenizer": name})
        open(prefix + ".meta.json", "w").write(json.dumps(meta))
        return PackedDataset(prefix)

    tiny = vocab_sha256(tiny_tokenizer)
    train, valid, other = dataset("train", tiny), dataset("valid", tiny), dataset("other", "0" * 64)
    cfg = _cfg(ParallelConfig(), 1)
    check_tokenizers([train, valid], cfg)
    with pytest.raises(DataError, match=r"different tokenizers:\n.*train: train .*\n.*other: other"):
        check_tokenizers([train, other], cfg)
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "ckpt" / "tokenizer")
    cfg = dataclasses.replace(cfg, checkpoint=CheckpointConfig(pretrained=str(tmp_path / "ckpt")))
    check_tokenizers([train, valid], cfg)
    with pytest.raises(DataError, match="checkpoint.pretrained tokenizer"):
        check_tokenizers([other], cfg)


@pytest.mark.parametrize("vp, expected", [(None, [4, 1]), (2, [4, 2])])
def test_eval_batches_under_interleaving_come_in_multiples_of_pp(tmp_path, vp, expected):
    """5 packs, global batch 4, PP=2, one DP rank: the last batch of 1 micro-batch gets a
    zero-weight filler under VP (Megatron's interleaved schedule runs groups of PP)."""
    ds = PackedDataset(write_packed(tmp_path / "d", conversations(5, seed=2), seq_length=256,
                                    packs=[[i] for i in range(5)]))
    cfg = _cfg(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vp), 1)
    builder = BatchBuilder([ds], [0], cfg, pad_to_length=fixed_micro_batch_length([ds], cfg))
    batches = eval_micro_batches(builder, [len(ds)], cfg, dp_rank=0, dp_size=1, max_batches=None)
    assert [len(b) for b in batches] == expected
    assert [b.num_targets > 0 for b in batches[-1]] == [True] + [False] * (expected[-1] - 1)
    assert all(float(b.loss_weight.sum()) == 0 for b in batches[-1][1:])
