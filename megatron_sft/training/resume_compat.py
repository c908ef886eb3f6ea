"""Is a checkpoint compatible with this run? Checked before any weight is loaded.

Resume (``checkpoint.load``): the config saved in the checkpoint (``config.yaml``) is compared
with this run's. Model fields must be equal (``RUN_CHOICE_MODEL_KEYS`` and ``init_method_std``
excepted: no loaded weight depends on them): each difference is listed in one error. Every other
difference (batch size, steps, layout, data, ...) is allowed and logged. The learning-rate
schedule (``SCHEDULE_KEYS``) follows this run's config from the resumed step on (Megatron's
``override_opt_param_scheduler``; ``optimizer.adopt_learning_rates`` lets the saved optimizer
state load under another lr): a change there is logged as taking effect. Data may change if its tokenizer vocabulary is the
same size (the saved ``data_meta.json`` against this run's).

Both resume and ``checkpoint.pretrained``: the model tensors the checkpoint holds (names and global
shapes, from its ``.metadata``) must be exactly the ones this model has, so a 32,000-row embedding
is never loaded into a 151,680-row model, nor a 4-layer checkpoint into 2 layers.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Tuple

import yaml

from megatron_sft.checkpoint_files import CheckpointError, gather_all, global_rank
from megatron_sft.config import RUN_CHOICE_MODEL_KEYS, SFTConfig, config_to_dict
from megatron_sft.training import checkpoint_guard as guard

logger = logging.getLogger("megatron_sft")

FREE_MODEL_KEYS = (*RUN_CHOICE_MODEL_KEYS, "init_method_std")
"""Model fields that may change on resume: no loaded weight depends on them."""
SCHEDULE_KEYS = tuple(f"training.{k}" for k in ("lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style",
                                                 "weight_decay"))
"""Schedule settings: on resume this run's values apply from the resumed step (logged apart)."""


def _flatten(config: dict) -> Dict[str, object]:
    """``{"model": {"num_layers": 4}}`` -> ``{"model.num_layers": 4}`` (a nested value such as
    ``model.rope_scaling`` stays whole: one line per field)."""
    return {f"{section}.{key}": value for section, fields in config.items() if isinstance(fields, dict)
            for key, value in fields.items()}


_UNSET = object()
IGNORED_SECTIONS = ("checkpoint", "logging")
"""Where a run reads and writes: different on every resume by design, not worth a line."""


def _show(value) -> str:
    return "unset" if value is _UNSET else json.dumps(value)


def config_differences(saved: dict, current: dict) -> Tuple[List[str], List[str], List[str]]:
    """(errors, changes that take effect, changes kept from the checkpoint) between a
    checkpoint's saved config and this run's, as ``"model.num_layers: checkpoint 4, this run 2"``."""
    old, new = _flatten(saved), _flatten(current)
    errors, changes, kept = [], [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        section, _, name = key.partition(".")
        if a == b or section in IGNORED_SECTIONS:
            continue
        line = f"{key}: checkpoint {_show(a)}, this run {_show(b)}"
        free = name in FREE_MODEL_KEYS
        if section == "model" and not free:
            errors.append(line)
        else:
            (kept if key in SCHEDULE_KEYS else changes).append(line)
    return errors, changes, kept


def data_differences(saved_meta: dict, current_meta: dict) -> Tuple[List[str], List[str]]:
    """(errors, notes) between the checkpoint's training data meta and this run's."""
    errors, notes = [], []
    if not saved_meta or not current_meta:
        return errors, notes
    if saved_meta.get("vocab_size") != current_meta.get("vocab_size"):
        errors.append(f"data tokenizer: checkpoint {saved_meta.get('tokenizer')!r} of {saved_meta.get('vocab_size')} "
                      f"tokens, this run {current_meta.get('tokenizer')!r} of {current_meta.get('vocab_size')}")
    elif saved_meta.get("tokenizer") != current_meta.get("tokenizer"):
        notes.append(f"data tokenizer named {saved_meta.get('tokenizer')!r} in the checkpoint, "
                     f"{current_meta.get('tokenizer')!r} now (same vocabulary size)")
    if saved_meta.get("chat_template_sha256") != current_meta.get("chat_template_sha256"):
        notes.append("data chat template changed (chat_template_sha256 differs)")
    return errors, notes


def check_resume_config(path: str, cfg: SFTConfig, data_meta: dict, *, eval_only: bool) -> None:
    """Every rank (reads two small files, logs on rank 0): raise CheckpointError listing every model difference
    between checkpoint ``path``'s saved config and ``cfg``; log the allowed changes."""
    config_file = os.path.join(path, "config.yaml")
    rank0 = global_rank() == 0
    if not os.path.isfile(config_file):
        if rank0:
            logger.warning("%s has no config.yaml: cannot compare its settings with this run's", path)
        return
    with open(config_file) as f:
        saved = yaml.safe_load(f) or {}
    errors, changes, kept = config_differences(saved, config_to_dict(cfg))
    meta_file = os.path.join(path, "data_meta.json")
    if not eval_only and os.path.isfile(meta_file):
        with open(meta_file) as f:
            data_errors, notes = data_differences(json.load(f), data_meta)
        errors += data_errors
        changes += notes
    if errors:
        lines = "\n  - ".join(errors)
        raise CheckpointError(
            f"cannot resume from {path}: the model or tokenizer differs from the one it was trained with:\n  - {lines}\n"
            f"Resume with the checkpoint's values (its config is {config_file}), or start a new run from its weights "
            "with --checkpoint.pretrained (model fields must still match) and a new checkpoint.save")
    if changes and rank0 and not eval_only:
        logger.info("resuming %s with changed settings (allowed):\n  - %s", path, "\n  - ".join(changes))
    if kept and not eval_only and rank0:
        logger.warning("resuming %s: the learning-rate schedule changes from the resumed step on (this run's "
                       "values apply):\n  - %s", path, "\n  - ".join(kept))


def model_tensor_shapes(sharded_state_dict: dict) -> Dict[str, tuple]:
    """{checkpoint key: global shape} of every ShardedTensor in ``sharded_state_dict`` (this
    rank), factories (e.g. the fused SwiGLU ``linear_fc1``) built first: pass a throwaway dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    return {v.key: tuple(v.global_shape) for v in nested_values(sharded_state_dict) if isinstance(v, ShardedTensor)}


def checkpoint_tensor_shapes(path: str) -> Dict[str, tuple]:
    """{key: global shape} of the model tensors stored in checkpoint ``path`` (its ``.metadata``;
    optimizer states and byte objects left out)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(path).read_metadata()
    return {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and not key.startswith("optimizer.")}


def shape_differences(ours: Dict[str, tuple], theirs: Dict[str, tuple], limit: int = 8) -> List[str]:
    lines = [f"{key}: checkpoint {list(theirs[key])}, this model {list(ours[key])}"
             for key in sorted(set(ours) & set(theirs)) if ours[key] != theirs[key]]
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing:
        lines.append(f"{len(missing)} tensor(s) of this model not in the checkpoint: {', '.join(missing[:limit])}")
    if extra:
        lines.append(f"{len(extra)} tensor(s) of the checkpoint not in this model: {', '.join(extra[:limit])}")
    return lines[:limit + 2]


def check_model_tensors(path: str, model_state: dict, what: str) -> None:
    """Collective: CheckpointError on every rank when the model tensors of checkpoint ``path``
    differ from this model's (all pipeline stages together). ``what`` names the config key.
    ``model_state``: a fresh ``model_sharded_state_dict`` (its factories are built here)."""
    ours: Dict[str, tuple] = {}
    for rank_shapes in gather_all(model_tensor_shapes(model_state)):
        ours.update(rank_shapes)
    error = None
    if global_rank() == 0:
        try:
            problems = shape_differences(ours, checkpoint_tensor_shapes(path))
        except Exception as err:  # an unreadable .metadata: verification normally reports it first
            problems = [f"cannot read {os.path.join(path, '.metadata')}: {err}"]
        if problems:
            error = (f"{what}={path} holds another model than this one:\n  - " + "\n  - ".join(problems) +
                     f"\nGive the model section of that checkpoint (omit model: to take it from its config.yaml), "
                     f"or point {what} at a checkpoint of this model")
    guard.raise_if_any(error)
