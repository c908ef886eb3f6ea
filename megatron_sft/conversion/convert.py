"""The two conversions as library functions (the tools/ CLIs are thin wrappers).

HF -> Megatron reads a local HF folder or a hub name (``megatron_sft.hub.resolve_hf_dir``) and
writes ``OUT/``::

    metadata.json, .metadata, *.distcp   dist checkpoint, the model under key "model"
    config.yaml                          ``model:`` section (a ModelConfig): the trainer takes it
                                         from here with ``--checkpoint.pretrained=OUT``
    manifest.json                        size + crc32 of each file above (verified before loading)
    hf_config.json, hf_generation_config.json   the source model's, used again on export
    tokenizer/                           the source model's tokenizer files, verbatim

Megatron -> HF reads a trainer save dir (its latest iteration), one ``iter_*`` dir or a converted
dir, and writes safetensors shards + index, config.json, generation_config.json and the tokenizer
with the chat template used in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import typing
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Literal, Optional

import torch
import yaml
from tqdm import tqdm

from megatron_sft.atomic import publish_dir, staging_dir
from megatron_sft.checkpoint_files import checkpoint_path, checksum, verify, write_manifest
from megatron_sft.config import ConfigError, ModelConfig, build_section, model_split_problems
from megatron_sft.conversion import dist_io, hf_io
from megatron_sft.hub import HubError, resolve_hf_dir
from megatron_sft.conversion.common import (
    Architecture,
    ConcreteRule,
    ConversionError,
    architecture_by_name,
    architecture_for,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)

DtypeName = Literal["bf16", "fp16", "fp32"]
DTYPES = dict(zip(typing.get_args(DtypeName), (torch.bfloat16, torch.float16, torch.float32)))
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
HF_CONFIG = "hf_config.json"
HF_GENERATION_CONFIG = "hf_generation_config.json"
TOKENIZER_DIR = "tokenizer"
CONFIG_YAML = "config.yaml"
DATA_META = "data_meta.json"


# --------------------------------------------------------------------------------- HF -> Megatron


def hf_to_megatron(hf_dir, out_dir, *, tensor_model_parallel_size: int = 1,
                   pipeline_model_parallel_size: int = 1, dtype: Optional[str] = None,
                   layer_layout: str = "per-layer", progress: bool = True) -> ModelConfig:
    """Convert the HF checkpoint ``hf_dir`` (a folder or a hub name) into a Megatron dist
    checkpoint ``out_dir``.

    Tensors keep their dtype unless ``dtype`` (bf16|fp16|fp32) is given. Streaming: one HF tensor
    group is read at a time; the converted model is held once (dist_checkpointing saves it whole).
    ``layer_layout``: see :func:`dist_io.save_model` (``per-layer`` is the canonical one).
    """
    source, out_dir = str(hf_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):  # fail before a download
        raise ConversionError(f"{out_dir} exists and is not empty; choose a new --out directory")
    hf_dir = Path(_resolve(source, "model"))
    hf_config = hf_io.read_json(hf_dir / "config.json", "HF config.json")
    arch = architecture_for(hf_config)
    cfg = arch.to_model_config(hf_config)
    problems = model_split_problems(cfg, tensor_model_parallel_size, pipeline_model_parallel_size, qualified=False)
    if problems:
        raise ConversionError("cannot use the requested layout:\n  - " + "\n  - ".join(problems))
    reader = hf_io.SafetensorsReader(hf_dir)
    rules = arch.rules(cfg)
    _check_hf_keys(arch, rules, reader.keys(), hf_dir)
    if not any((hf_dir / n).is_file() for n in hf_io.TOKENIZER_FILES):
        raise ConversionError(f"no tokenizer files in {hf_dir}; the converted model needs its tokenizer")
    _check_tokenizer_fits(hf_dir, cfg.vocab_size)

    cast = DTYPES[dtype] if dtype else None
    tensors: Dict[str, torch.Tensor] = {}
    for key, tensor in tqdm(convert_hf_to_megatron(reader.get, rules, cfg), total=len(rules),
                            desc="HF -> Megatron", unit="tensor", disable=not progress):
        tensors[key] = tensor.to(cast) if cast is not None else tensor
    reader.close()
    with _staging(out_dir) as tmp:
        dist_io.save_model(tensors, tmp, layer_layout)
        del tensors
        hf_io.copy_tokenizer_files(hf_dir, tmp / TOKENIZER_DIR)
        _copy_json(hf_dir / "config.json", tmp / HF_CONFIG)
        if (hf_dir / "generation_config.json").is_file():
            _copy_json(hf_dir / "generation_config.json", tmp / HF_GENERATION_CONFIG)
        (tmp / CONFIG_YAML).write_text(config_yaml(cfg, arch, tensor_model_parallel_size,
                                                   pipeline_model_parallel_size, out_dir, layer_layout, source))
        _write_manifest(tmp)
    return cfg


def _check_tokenizer_fits(hf_dir: Path, vocab_size: int) -> None:
    """A tokenizer with more tokens than the model has embedding rows produces ids the model
    cannot embed: an error here, not a crash (or silent garbage) in training."""
    from transformers import AutoTokenizer

    try:
        num_tokens = len(AutoTokenizer.from_pretrained(str(hf_dir)))
    except Exception as err:  # a tokenizer transformers cannot load: its size is checked again at preprocessing
        warnings.warn(f"cannot load the tokenizer of {hf_dir} to check its size ({type(err).__name__}: {err})")
        return
    if num_tokens > vocab_size:
        raise ConversionError(f"the tokenizer in {hf_dir} has {num_tokens} tokens but the model's vocab_size (embedding "
                              f"rows) is {vocab_size}: ids >= {vocab_size} cannot be embedded. Convert the model "
                              "together with the tokenizer it was trained with")


def _write_manifest(directory: Path) -> None:
    """The trainer's checksum manifest (``megatron_sft.checkpoint_files``) over the top-level files,
    so ``--checkpoint.pretrained`` verifies a converted model before loading it."""

    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    write_manifest(str(directory), checksum(str(directory), names), 0, "converted", [])


def _resolve(name_or_path: str, files: str) -> str:
    """A local folder or hub name -> a local folder (megatron_sft.hub), as a ConversionError."""
    try:
        return resolve_hf_dir(name_or_path, files=files)
    except HubError as err:
        raise ConversionError(str(err)) from err


@contextlib.contextmanager
def _staging(out_dir: Path):
    """Write into ``OUT.incomplete`` and rename it to ``OUT`` on success: an interrupted
    conversion never leaves a directory that looks complete."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; choose a new --out directory")
    tmp = Path(staging_dir(out_dir))
    yield tmp
    publish_dir(tmp, out_dir)  # an empty out_dir (checked above) is replaced


def _check_hf_keys(arch: Architecture, rules: List[ConcreteRule], keys: Iterable[str], hf_dir: Path) -> None:
    """Every tensor the key map needs is there, and no HF tensor would be silently dropped."""
    keys = set(keys)
    needed = {k for r in rules for k in r.hf}
    missing = sorted(needed - keys)
    extra = hf_io.unmatched(sorted(keys - needed), arch.ignored_hf_keys)
    if missing or extra:
        raise ConversionError(
            f"{hf_dir} does not match the {arch.model_type} key map for its config.json: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")


def _copy_json(src: Path, dst: Path) -> None:
    dst.write_text(src.read_text())


def config_yaml(cfg: ModelConfig, arch: Architecture, tp: int, pp: int, out_dir: Path,
                layer_layout: str = "per-layer", source: Optional[str] = None) -> str:
    """The ``model:`` section for the converted checkpoint, with a note on how to use it."""
    header = (
        f"# Converted from the Hugging Face {arch.hf_architecture} checkpoint {source or ''} "
        f"({layer_layout} layer keys).\n"
        "# The trainer takes this model: section from here; a recipe needs none (an explicit model value\n"
        "# must equal this one, except attention_backend and max_position_embeddings):\n"
        "#   python pretrain_sft.py --config yaml_configs/recipes/sft_converted_1gpu.yaml \\\n"
        f"#       --checkpoint.pretrained={out_dir} --data.train_prefix=PREFIX\n"
        f"# Checked layout: tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} (the\n"
        "# checkpoint itself loads at any TP/PP). Tokenizer for preprocess_data.py: tokenizer/ here.\n"
    )
    return header + yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False)


# --------------------------------------------------------------------------------- Megatron -> HF


def model_config_from_yaml(path: Path) -> ModelConfig:
    """The ``model:`` section of a config.yaml as a ModelConfig (unknown keys are an error)."""
    if not path.is_file():
        raise ConversionError(f"{path} not found: a checkpoint needs its config.yaml to be exported")
    section = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(section, dict):
        raise ConversionError(f"{path} has no 'model:' section")
    try:  # the trainer's strict loader: unknown, missing and mistyped keys all reported
        return build_section(ModelConfig, section, "model.", str(path))
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None


def resolve_checkpoint(path: Path) -> Path:
    """A save dir (its latest iteration), an ``iter_*`` dir or a converted dir -> the dist ckpt dir."""
    if not Path(path).is_dir():
        raise ConversionError(f"Megatron checkpoint directory {path} does not exist")
    try:
        return Path(checkpoint_path(str(path)))
    except (FileNotFoundError, ValueError) as err:
        raise ConversionError(str(err)) from err


def _find_file(name: str, dirs: Iterable[Path]) -> Optional[Path]:
    return next((Path(d) / name for d in dirs if d and (Path(d) / name).exists()), None)


def _origin_dirs(ckpt: Path) -> List[Path]:
    """Where the files of the model a checkpoint started from may be: the checkpoint, its save
    dir, and the converted dir its config names as ``checkpoint.pretrained``."""
    dirs = [ckpt, ckpt.parent]
    cfg_path = _find_file(CONFIG_YAML, dirs)
    if cfg_path is not None:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        pretrained = (raw.get("checkpoint") or {}).get("pretrained")
        if pretrained and Path(pretrained).is_dir():
            try:
                dirs.append(resolve_checkpoint(Path(pretrained)))
            except ConversionError:
                pass
            dirs.append(Path(pretrained))
    return dirs


def megatron_to_hf(megatron_dir, out_dir, *, tokenizer: Optional[str] = None, dtype: Optional[str] = None,
                   max_shard_bytes: int = 5 * 1024**3, progress: bool = True) -> Path:
    """Export a Megatron checkpoint to an HF model directory ``out_dir``; returns it. A
    checkpoint whose files differ from its manifest is an error (nothing is written)."""

    ckpt = resolve_checkpoint(Path(megatron_dir))
    cfg = model_config_from_yaml(_find_file(CONFIG_YAML, [ckpt, ckpt.parent]) or ckpt / CONFIG_YAML)
    problems = verify(str(ckpt))
    if problems:
        raise ConversionError(f"cannot read checkpoint {ckpt}: it fails verification ({'; '.join(problems[:5])}); "
                              "restore the file(s) from a copy or export another checkpoint")
    out_dir = Path(out_dir)
    origin = _origin_dirs(ckpt)
    base_path = _find_file(HF_CONFIG, origin)
    base = json.loads(base_path.read_text()) if base_path else {}
    arch = architecture_by_name(base["model_type"]) if base.get("model_type") else _infer_architecture(cfg)
    tok, data_meta = _load_tokenizer(tokenizer, ckpt, origin)
    template = data_meta.get("chat_template")
    cast = DTYPES[dtype] if dtype else None
    with _staging(out_dir) as tmp:
        written_dtypes = _write_weights(ckpt, tmp, arch, cfg, cast, max_shard_bytes, progress)
        hf_config = _hf_config(base, arch, cfg, written_dtypes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen_base_path = _find_file(HF_GENERATION_CONFIG, origin)
        gen_base = json.loads(gen_base_path.read_text()) if gen_base_path else None
        model_eos = hf_io.as_list(hf_config.get("eos_token_id")) + list(data_meta.get("end_of_turn_token_ids") or [])
        gen = hf_io.generation_config(gen_base, tok, template, model_eos)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _save_tokenizer(tok, template, tmp)
    return out_dir


def _infer_architecture(cfg: ModelConfig) -> Architecture:
    # Without the source config.json: the flags that set the families apart.
    if cfg.qk_layernorm:
        return architecture_by_name("qwen3")
    return architecture_by_name("qwen2" if cfg.add_qkv_bias else "llama")


def _write_weights(ckpt, out_dir, arch, cfg, cast, max_shard_bytes, progress) -> set:
    rules = arch.rules(cfg)
    with dist_io.single_process_group():
        meta = dist_io.tensor_metadata(ckpt)
        missing = sorted(r.megatron for r in rules if not dist_io.has_tensor(r.megatron, meta))
        if missing:
            raise ConversionError(f"{ckpt} lacks tensors its config.yaml implies: {missing[:8]}")
        writer = hf_io.ShardedSafetensorsWriter(out_dir, max_shard_bytes)
        by_key = {r.megatron: r for r in rules}
        dtypes = set()
        bar = tqdm(total=len(rules), desc="Megatron -> HF", unit="tensor", disable=not progress)
        for keys in dist_io.read_groups(list(by_key), meta):
            tensors = dist_io.load_tensors(ckpt, keys, meta)
            group = [by_key[k] for k in keys]
            for key, tensor in convert_megatron_to_hf(tensors.pop, group, cfg):
                tensor = tensor.to(cast) if cast is not None else tensor
                dtypes.add(tensor.dtype)
                writer.add(key, tensor)
            bar.update(len(group))
        bar.close()
        writer.close()
    return dtypes


def _hf_config(base: dict, arch: Architecture, cfg: ModelConfig, dtypes: set) -> dict:
    out = {k: v for k, v in base.items() if k not in ("transformers_version", "_name_or_path")}
    out.update(arch.to_hf_config(cfg))
    if not out.get("rope_scaling"):
        out.pop("rope_scaling", None)
    dtype = DTYPE_NAMES.get(max(dtypes, key=lambda d: torch.finfo(d).bits)) if dtypes else None
    out.pop("dtype", None)
    if dtype:
        out["torch_dtype"] = dtype  # read by transformers 4 and 5
    return out


def _load_tokenizer(tokenizer: Optional[str], ckpt: Path, origin: List[Path]):
    """(tokenizer, training data meta). Source, first found: ``tokenizer`` (a folder or hub name);
    the training data meta's tokenizer when it is an existing folder; the converted checkpoint's
    tokenizer/ folder; the data meta's tokenizer as a hub name."""
    from transformers import AutoTokenizer

    meta_path = _find_file(DATA_META, [ckpt, ckpt.parent])
    meta = json.loads(meta_path.read_text()) if meta_path else {}
    converted = _find_file(TOKENIZER_DIR, origin)
    meta_tok = meta.get("tokenizer")
    candidates = [tokenizer, meta_tok if meta_tok and Path(meta_tok).is_dir() else None,
                  str(converted) if converted else None, meta_tok]
    source = next((c for c in candidates if c), None)
    if source is None:
        raise ConversionError(
            f"no tokenizer for {ckpt}: no data_meta.json and no converted tokenizer/ folder found; "
            "pass --tokenizer PATH")
    folder = _resolve(source, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise ConversionError(f"cannot load tokenizer {source}: {err}; pass --tokenizer PATH") from err
    return tok, meta


def _save_tokenizer(tok, template: Optional[str], out_dir: Path) -> None:
    """Tokenizer files verbatim when the training template is the tokenizer's own; otherwise the
    tokenizer re-saved with the training template (what the model was fine-tuned on)."""
    if template is None or template == tok.chat_template:
        src = Path(tok.name_or_path)
        if src.is_dir() and any((src / n).is_file() for n in hf_io.TOKENIZER_FILES):
            hf_io.copy_tokenizer_files(src, out_dir)
            return
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(out_dir))
