"""The preprocessing settings (``tools/preprocess_data.py``'s flags as one dataclass), checked
all at once with the fix for each problem."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from megatron_sft.data.chat_masks import MASK_MODES, MaskMode
from megatron_sft.data.formats import FormatKeys
from megatron_sft.data.reports import shard_prefix
from megatron_sft.errors import InputError


@dataclass
class CompileConfig:
    """Settings of one compiler run (``tools/preprocess_data.py`` flags map onto these)."""

    inputs: list[str]
    """Input files, in order; ``source_index`` is the position in this list."""
    tokenizer: str
    """Tokenizer folder or Hugging Face hub name (``megatron_sft.hub``: cache, then download)."""
    output_prefix: str
    """Output path prefix: writes PREFIX_tokens.bin/.idx, PREFIX_loss_mask.*, PREFIX_provenance.*,
    PREFIX.meta.json, PREFIX.report.json (PREFIX_shard{i} when sharded)."""
    seq_length: int
    """Pack capacity in real tokens."""
    chat_template: str | None = None
    """Path of a Jinja chat template file replacing the tokenizer's own."""
    mode: MaskMode = "assistant"
    """Which turns are supervised: assistant | all | last_assistant."""
    workers: int = 1
    """Encoding processes; the output is byte-identical for any value."""
    on_error: Literal["fail", "skip"] = "fail"
    """fail: stop at the first bad record; skip: count it under its reason and go on."""
    overlength: Literal["drop", "truncate"] = "drop"
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
    num_shards: int = 1
    """Split the run into this many independent shards (e.g. one per SLURM array task)."""
    shard_index: int = 0
    """Which shard this run writes: conversations whose first record_index % num_shards equals it."""
    progress: bool = True
    """Show tqdm progress bars (stderr)."""
    overwrite: bool = False
    """Replace an existing file set at the output prefix (without it, an existing one is an error)."""

    def validate(self) -> None:
        """Raise ValueError listing every problem at once."""
        problems = []
        if not self.inputs:
            problems.append("no --input given")
        problems += [f"--input {p} does not exist" for p in self.inputs if not os.path.exists(p)]
        if self.seq_length < 1:
            problems.append(f"--seq-length must be >= 1, got {self.seq_length}")
        if self.mode not in MASK_MODES:
            problems.append(f"--mode must be {', '.join(MASK_MODES)}, got {self.mode!r}")
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
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            problems.append(f"--shard-index must be in 0..--num-shards-1, got shard {self.shard_index} of {self.num_shards}")
        if problems:
            raise InputError("invalid preprocessing settings:\n  " + "\n  ".join(problems))

    @property
    def merges_turns(self) -> bool:
        return self.pseudo_multiturn_prob > 0 and self.pseudo_multiturn_max_turns > 1

    def shard_output_prefix(self) -> str:
        """Where this run writes: ``output_prefix``, or ``output_prefix_shard{i}`` when sharded."""
        return shard_prefix(self.output_prefix, self.shard_index) if self.num_shards > 1 else self.output_prefix

    def in_shard(self, record_index: int) -> bool:
        return record_index % self.num_shards == self.shard_index


def config_as_dict(config: CompileConfig) -> dict:
    """The settings as JSON-ready values (for meta/report)."""
    values = dataclasses.asdict(config)
    values["format_keys"] = {k: v for k, v in values["format_keys"].items() if k != "role_map"}
    values.pop("progress")
    values.pop("overwrite")
    return values
