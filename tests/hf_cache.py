"""A Hugging Face hub cache built on disk (no network): ``HF_HUB_CACHE/models--org--name/
snapshots/<revision>/`` holding the files, ``refs/main`` naming the revision, as huggingface_hub
writes it. Point ``HF_HOME`` (cache = HF_HOME/hub) or ``HF_HUB_CACHE`` at it and set
``HF_HUB_OFFLINE=1`` to use hub names in tests."""

from __future__ import annotations

import shutil
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(hub_cache: Path, repo_id: str, files_from: Path, *, only=None) -> Path:
    """Copy the files of folder ``files_from`` (those named in ``only``, if given) into the cache as
    repository ``repo_id``; returns the snapshot folder."""
    repo = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in Path(files_from).iterdir():
        if path.is_file() and (only is None or path.name in only):
            shutil.copy(path, snapshot / path.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def offline_hub_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty hub cache under ``tmp_path``, offline, with an endpoint that refuses connections
    (never the real hub); returns the cache folder. For a pytest fixture."""
    from huggingface_hub import constants

    cache = Path(tmp_path) / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return cache
