"""Which tokenizer made a packed file set, and the check that every prefix of a run used the same one.

The compiler writes into ``PREFIX.meta.json``: ``tokenizer`` (the name or folder given to
``--tokenizer``: for people, it differs between machines) and ``tokenizer_vocab_sha256`` (the
identity: sha256 of the token -> id map, added tokens included; see ``vocab_sha256``). Two sets
are compatible when their hashes are equal, whatever folder the tokenizer was loaded from.
A meta written before the hash existed is still read: it is compared by ``vocab_size`` only, and
named in a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Mapping

from megatron_sft.errors import InputError

logger = logging.getLogger("megatron_sft")

HASH_KEY = "tokenizer_vocab_sha256"


def vocab_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id map (``get_vocab()``: base and added tokens), as JSON
    pairs sorted by id. Equal for the same vocabulary loaded from any folder or hub cache."""
    pairs = sorted(((int(i), str(t)) for t, i in tokenizer.get_vocab().items()))
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


def describe(meta: Mapping) -> str:
    """``NAME (vocab_size V, vocab sha256 abcdef123456)`` of one meta."""
    digest = meta.get(HASH_KEY)
    return (f"{meta.get('tokenizer', '?')} (vocab_size {meta.get('vocab_size', '?')}, "
            f"vocab sha256 {digest[:12] if digest else 'not recorded'})")


def check_same_tokenizer(metas: Mapping[str, Mapping], reference: tuple[str, Mapping] | None = None) -> None:
    """ValueError unless every ``prefix -> meta`` (and ``reference``: (what, meta-like dict with
    ``tokenizer``, ``vocab_size``, ``tokenizer_vocab_sha256``), e.g. the model's tokenizer) names
    the same tokenizer. Hashes are compared where recorded, vocab sizes where not; metas without a
    hash are named in one warning."""
    entries = dict(metas)
    if reference is not None:
        entries[reference[0]] = reference[1]
    hashes = {m.get(HASH_KEY) for m in entries.values()} - {None}
    sizes = {m.get("vocab_size") for m in entries.values()} - {None}
    unhashed = [p for p, m in metas.items() if m.get(HASH_KEY) is None]
    if unhashed:
        logger.warning("tokenizer identity not recorded in the meta of %s (written by an older "
                       "tools/preprocess_data.py): only vocab sizes are compared; re-run preprocessing to record it",
                       ", ".join(unhashed))
    if len(hashes) > 1 or len(sizes) > 1:
        listing = "\n  ".join(f"{p}: {describe(m)}" for p, m in entries.items())
        raise InputError(
            f"the datasets of this run were made with different tokenizers:\n  {listing}\n"
            "token ids mean different things across them: re-run tools/preprocess_data.py on every input with the "
            "same --tokenizer (the model's own)")
