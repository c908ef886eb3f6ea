"""Staging + rename: nothing that looks complete before the rename, the old copy back on failure."""

from __future__ import annotations

import os

import pytest

from megatron_sft.atomic import publish_dir, publish_files, staging_dir, write_text_atomic


def test_staging_dir_is_fresh_and_publish_replaces(tmp_path):
    final = tmp_path / "sub" / "out"
    leftover = staging_dir(final)
    (tmp_path / "sub" / "out.incomplete" / "partial").write_text("x")
    staging = staging_dir(final)  # an interrupted writer's leftover is removed
    assert staging == leftover and os.listdir(staging) == []
    (tmp_path / "sub" / "out.incomplete" / "a").write_text("new")
    final.mkdir()
    (final / "a").write_text("old")
    publish_dir(staging, final)
    assert (final / "a").read_text() == "new" and not os.path.exists(staging)
    assert not os.path.exists(str(final) + ".replaced")


def test_failed_publish_puts_the_old_copy_back(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    staging = staging_dir(final)
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == staging:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        publish_dir(staging, final, keep_replaced=True)
    assert (final / "a").read_text() == "old" and not os.path.exists(str(final) + ".replaced")


def test_publish_files_moves_the_marker_last(tmp_path):
    (tmp_path / "new.bin").write_text("data")
    (tmp_path / "new.meta").write_text("meta")
    (tmp_path / "set.meta").write_text("old meta")
    with pytest.raises(ValueError, match="must be moved last"):
        publish_files([(tmp_path / "new.meta", tmp_path / "set.meta"), (tmp_path / "new.bin", tmp_path / "set.bin")],
                      marker=tmp_path / "set.meta")
    publish_files([(tmp_path / "new.bin", tmp_path / "set.bin"), (tmp_path / "new.meta", tmp_path / "set.meta")],
                  marker=tmp_path / "set.meta")
    assert (tmp_path / "set.bin").read_text() == "data" and (tmp_path / "set.meta").read_text() == "meta"


def test_write_text_atomic(tmp_path):
    path = tmp_path / "latest"
    write_text_atomic(path, "3\n")
    write_text_atomic(path, "4\n")
    assert path.read_text() == "4\n" and sorted(os.listdir(tmp_path)) == ["latest"]
