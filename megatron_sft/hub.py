"""A Hugging Face model or tokenizer given as a local folder or a hub name -> a local folder.

One resolver for every tool that takes one (``convert_hf_to_megatron.py --hf``,
``convert_megatron_to_hf.py --tokenizer``, ``preprocess_data.py --tokenizer``), in the order the
field uses (transformers, ms-swift, Megatron-Bridge):

1. an existing local folder is used as it is;
2. a hub name (``Qwen/Qwen2.5-0.5B-Instruct``) already in the huggingface_hub cache (``HF_HOME``
   / ``HF_HUB_CACHE``) is used from there without touching the network;
3. otherwise, unless ``HF_HUB_OFFLINE=1``, it is downloaded into that cache (only the files the
   caller needs: no weights for a tokenizer);
4. anything else is a HubError that names both possibilities and how to fix each.
"""

from __future__ import annotations

import glob
import os
from typing import Literal

from megatron_sft.errors import SFTError

# What each caller needs from a repository: config, weights and tokenizer for a conversion; the
# tokenizer files (any family: tokenizer.json, vocab/merges, sentencepiece, tiktoken) and the
# chat template for a tokenizer.
_TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
PATTERNS = {"tokenizer": _TOKENIZER_PATTERNS, "model": _TOKENIZER_PATTERNS + ["*.safetensors"]}


class HubError(SFTError, ValueError):
    """A name that is neither a local folder nor a usable hub model (message says the fix)."""


def resolve_hf_dir(name_or_path: str, *, files: Literal["model", "tokenizer"] = "model") -> str:
    """The local folder holding ``name_or_path``'s ``files`` (see the module docstring for the
    order). Raises HubError when there is none."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    name = str(name_or_path)
    if os.path.isdir(name):
        return name
    try:
        cached = snapshot_download(name, allow_patterns=PATTERNS[files], local_files_only=True)
        if _complete(cached, files):
            return cached
    except HFValidationError:
        raise HubError(f"{name} is not a local folder (no such directory) and not a valid Hugging Face "
                       "hub name (org/model): fix the path") from None
    except LocalEntryNotFoundError:
        cached = None
    where = (f"not a local folder, and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
             + (f"holds an incomplete snapshot of it ({cached}, {_needs(files)} missing)" if cached
                else "has no snapshot of it"))
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{name}: {where}, and HF_HUB_OFFLINE=1 forbids downloading it: pass a local folder, "
                       "or unset HF_HUB_OFFLINE to download it, or point HF_HOME/HF_HUB_CACHE at a cache "
                       "that holds it")
    try:
        folder = snapshot_download(name, allow_patterns=PATTERNS[files])
    except Exception as err:  # network down, repository missing, gated: the hub says which
        raise HubError(f"{name}: {where}, and downloading it failed ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''}): pass a local folder, or make the "
                       "hub reachable (token for gated models: `hf auth login`), or point HF_HOME/HF_HUB_CACHE "
                       "at a cache that holds it (works offline, HF_HUB_OFFLINE=1)") from err
    if not _complete(folder, files):
        raise HubError(f"{name}: the hub repository has no {_needs(files)} (downloaded to {folder})")
    return folder


def _complete(folder: str, files: str) -> bool:
    """A tokenizer needs a tokenizer file; a model also its config.json and safetensors weights
    (a cached snapshot may hold only what an earlier AutoTokenizer call fetched)."""
    has_tokenizer = any(os.path.isfile(os.path.join(folder, n)) for n in
                        ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"))
    if files == "tokenizer":
        return has_tokenizer
    return (has_tokenizer and os.path.isfile(os.path.join(folder, "config.json"))
            and bool(glob.glob(os.path.join(folder, "*.safetensors"))))


def _needs(files: str) -> str:
    return "tokenizer files" if files == "tokenizer" else "config.json, *.safetensors or tokenizer files"
