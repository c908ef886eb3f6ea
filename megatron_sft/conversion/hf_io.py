"""HF-side files: streaming safetensors reader/writer, tokenizer files, generation config.

Reading opens every shard with ``safe_open`` and returns one tensor at a time (no full copy);
writing buffers tensors up to ``max_shard_bytes`` and then writes a shard, so export holds at most
one shard plus one layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_sft.conversion.common import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a tokenizer may consist of (any family); copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{what} not found: {path}")
    with open(path) as f:
        return json.load(f)


class SafetensorsReader:
    """The tensors of an HF checkpoint directory, read one at a time.

    Accepts ``model.safetensors.index.json`` + shards, or a single ``model.safetensors``.
    """

    def __init__(self, hf_dir: Path):
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            self.weight_map: Dict[str, str] = read_json(index, "safetensors index")["weight_map"]
        elif (self.hf_dir / SINGLE_FILE).is_file():
            with safe_open(str(self.hf_dir / SINGLE_FILE), framework="pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            bins = sorted(p.name for p in self.hf_dir.glob("*.bin"))
            hint = (f" (found {', '.join(bins[:3])}: re-save with model.save_pretrained(..., "
                    "safe_serialization=True))") if bins else ""
            raise ConversionError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.hf_dir}{hint}")
        missing = sorted({f for f in self.weight_map.values() if not (self.hf_dir / f).is_file()})
        if missing:
            raise ConversionError(f"{self.hf_dir}: shard file(s) named in the index are missing: {missing}")
        self._handles: Dict[str, object] = {}

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise ConversionError(f"tensor {key!r} not found in {self.hf_dir}")
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.hf_dir / name), framework="pt")
        return self._handles[name].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000N.safetensors`` shards and ``model.safetensors.index.json``.

    Shards are written under temporary names as they fill and renamed at :meth:`close`, when the
    shard count is known.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 1024**3):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> List[str]:
        """Write the last shard and the index; returns the shard file names."""
        if self._buffer:
            self._flush()
        n = len(self._shards)
        names, weight_map = [], {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f".shard-{i:05d}.tmp", self.out_dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(self.out_dir / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)
        return names


def copy_tokenizer_files(src: Path, dst: Path) -> List[str]:
    """Copy the tokenizer files of ``src`` into ``dst`` verbatim; error when there are none."""
    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    if not names:
        raise ConversionError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {src}")
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names


def end_of_turn_token(tokenizer, chat_template: Optional[str] = None) -> Optional[str]:
    """The special token a chat template puts right after an assistant message, e.g.
    ``<|im_end|>`` (ChatML), ``<|eot_id|>`` (Llama 3), ``</s>`` (Mistral). Found by rendering a
    two-message conversation with a sentinel reply; None when nothing special follows it."""
    sentinel = "SENTINEL-7f3a"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    except Exception:  # a template that needs other roles/fields: no guess
        return None
    pos = text.find(sentinel)
    if pos < 0:
        return None
    rest = text[pos + len(sentinel):]
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    stripped = rest.lstrip(" \n")
    for token in specials:
        if token and stripped.startswith(token):
            return token
    return None


def as_list(value) -> List[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def generation_config(base: Optional[dict], tokenizer, chat_template: Optional[str], model_eos) -> dict:
    """generation_config.json: ``base`` (the original model's, when known) with ``eos_token_id``
    a list holding the model's eos id(s), the tokenizer's eos and the template's end-of-turn."""
    out = dict(base or {})
    eos: List[int] = as_list(out.get("eos_token_id")) + as_list(model_eos)
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    eot = end_of_turn_token(tokenizer, chat_template)
    if eot is not None:
        eos.append(tokenizer.convert_tokens_to_ids(eot))
    out["eos_token_id"] = list(dict.fromkeys(eos))
    if "bos_token_id" not in out and tokenizer.bos_token_id is not None:
        out["bos_token_id"] = tokenizer.bos_token_id
    if "pad_token_id" not in out and tokenizer.pad_token_id is not None:
        out["pad_token_id"] = tokenizer.pad_token_id
    out.setdefault("do_sample", False)
    out.pop("transformers_version", None)
    return out


def unmatched(keys: Iterable[str], patterns: Sequence[str]) -> List[str]:
    """Keys not matching any pattern (``{}`` = a layer number)."""
    regexes = [re.compile(re.escape(p).replace(re.escape("{}"), r"\d+") + r"\Z") for p in patterns]
    return [k for k in keys if not any(r.match(k) for r in regexes)]
