"""``--tokenizer`` and ``--chat-template`` of the compiler: from what a user typed to a loaded
tokenizer and the template text, or a CompileError that says what is wrong and how to fix it.

What is refused, before transformers sees it (its own errors name neither the folder nor the fix:
"install sentencepiece or tiktoken", or an all-``<unk>`` tokenizer built silently):

* a path that does not exist (a hub name goes to ``megatron_sft.hub``: cache, then download);
* a file, an empty folder, a folder with no tokenizer files;
* a *template-only* folder: a chat template (``chat_template.jinja`` or ``tokenizer_config.json``'s
  ``chat_template``) but no vocabulary (``tokenizer.json``, ``vocab.json`` + ``merges.txt``,
  ``tokenizer.model``, ``*.tiktoken``, ``vocab.txt``).

After loading, a probe text must encode to known tokens.
"""

from __future__ import annotations

import json
import os

from megatron_sft.data.reports import CompileError

_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model",
                     "sentencepiece.bpe.model")
_VOCABULARY_SUFFIXES = (".tiktoken", ".model")
_NEEDS = "tokenizer.json, or vocab.json + merges.txt, or tokenizer.model"
_PROBE_TEXT = "Hello, world! The answer is 42."


def resolve_tokenizer(name_or_path: str) -> str:
    """The local folder of ``--tokenizer``: an existing folder, or a hub name through the Hugging
    Face cache (downloading tokenizer files when allowed). Raises CompileError with the fix."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        check_tokenizer_folder(name)
        return name
    if os.path.isfile(name):
        hint = (f"; a template file goes to --chat-template {name}" if name.endswith((".jinja", ".j2")) else "")
        raise CompileError(f"--tokenizer {name} is a file: pass the folder holding the model's tokenizer files "
                           f"({_NEEDS}, tokenizer_config.json){hint}")
    if _looks_like_path(name):
        raise CompileError(f"--tokenizer {name}: no such folder; pass the model's tokenizer folder ({_NEEDS}) "
                           "or a Hugging Face hub name such as Qwen/Qwen2.5-7B-Instruct")
    from megatron_sft.hub import HubError, resolve_hf_dir

    try:
        folder = resolve_hf_dir(name, files="tokenizer")
    except HubError as err:
        raise CompileError(f"--tokenizer {err}") from None
    check_tokenizer_folder(folder, shown=name)
    return folder


def _looks_like_path(name: str) -> bool:
    """A name no hub repository can have (``org/model`` is ambiguous: the hub decides)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def check_tokenizer_folder(folder: str, shown: str | None = None) -> None:
    """CompileError for a folder that cannot hold a usable tokenizer (see the module docstring)."""
    shown = shown or folder
    files = sorted(os.listdir(folder))
    if not files:
        raise CompileError(f"--tokenizer {shown} is an empty folder: point it at the model's tokenizer folder "
                           f"({_NEEDS}) or a hub name such as Qwen/Qwen2.5-7B-Instruct")
    if any(f in _VOCABULARY_FILES or f.endswith(_VOCABULARY_SUFFIXES) for f in files):
        return
    template = _template_file(folder, files)
    if template is not None:
        raise CompileError(
            f"--tokenizer {shown} holds a chat template ({template}) but no vocabulary ({_NEEDS}): a template-only "
            "folder cannot tokenize. Point --tokenizer at the model's own tokenizer (its folder or hub name, e.g. "
            f"meta-llama/Llama-3.1-8B-Instruct) and, to render with this template, add --chat-template {template}"
        )
    raise CompileError(f"--tokenizer {shown} holds no tokenizer files (found: {', '.join(files[:8])}); "
                       f"it needs {_NEEDS}: point it at the model's tokenizer folder or hub name")


def _template_file(folder: str, files: list[str]) -> str | None:
    """The chat template a folder carries, as a path to give --chat-template (None if none)."""
    if "chat_template.jinja" in files:
        return os.path.join(folder, "chat_template.jinja")
    if "tokenizer_config.json" in files:
        try:
            with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
                if json.load(f).get("chat_template"):
                    return f"FILE (the chat_template of {os.path.join(folder, 'tokenizer_config.json')} saved as .jinja)"
        except (OSError, ValueError, AttributeError):
            return None
    return None


def load_tokenizer(folder: str, shown: str | None = None):
    """``AutoTokenizer.from_pretrained(folder)``, its errors and a tokenizer that cannot encode
    text (all ``<unk>``) turned into CompileError naming ``shown`` (what the user typed)."""
    from transformers import AutoTokenizer

    shown = shown or folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for broken folders
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CompileError(f"--tokenizer {shown}: transformers cannot load it ({type(err).__name__}: {first}); "
                           f"point --tokenizer at the model's complete tokenizer folder ({_NEEDS})") from err
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and sum(i == unk for i in ids) * 2 >= len(ids)):
        raise CompileError(
            f"--tokenizer {shown} has {len(tokenizer)} tokens and encodes {_PROBE_TEXT!r} as {ids} (unknown tokens): "
            f"its vocabulary files ({_NEEDS}) are missing; point --tokenizer at the model's complete tokenizer "
            "(a template-only folder goes to --chat-template)"
        )
    return tokenizer


def resolve_chat_template(tokenizer, template_path: str | None) -> str:
    """The template text in use: the file's, else the tokenizer's; CompileError when neither."""
    if template_path is not None:
        with open(template_path, encoding="utf-8") as f:
            return f.read()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    if not template:
        raise CompileError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template "
            "(reason no_chat_template); pass --chat-template FILE (e.g. the model's chat_template.jinja)"
        )
    return template
