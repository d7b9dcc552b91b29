"""The CacheStore on its own: a full disk while storing an entry, entries that failed to
restore discarded and replaced (also by another process meanwhile), the kind of an entry in
its metadata. A full disk is injected: a real one cannot be reached."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from cached_prompts.backend.interface import PreludeKind
from cached_prompts.cache.store import META_SUFFIX, STATE_SUFFIX, CacheStore, StateSettings
from cached_prompts.errors import CacheError, CacheWriteError

SETTINGS = StateSettings("0" * 64, "f16", "test")


# ----- the cache: full disk, entries that fail to restore --------------------------------------


def _cache_files(folder: Path) -> list[str]:
    """Entry files and temp files; not the folder's lock file."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != ".lock") if folder.is_dir() else []


def _fail_meta_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if str(dst).endswith(META_SUFFIX):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _fail_every_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("inject", [_fail_every_fsync, _fail_meta_rename])
def test_a_full_disk_while_storing_an_entry_is_a_cache_write_error_that_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject) -> None:
    folder = tmp_path / "cache"
    store = CacheStore(folder, SETTINGS)
    kept = store.store("kept", PreludeKind.PRELUDE, [1, 2], b"k" * 1000)
    inject(monkeypatch)
    with pytest.raises(CacheWriteError) as raised:
        store.store("new", PreludeKind.PRELUDE, [1, 2, 3], b"n" * 5000)
    monkeypatch.undo()
    assert isinstance(raised.value, CacheError)
    message = str(raised.value)
    assert "new" in message and "--cache-max-size" in message and "free" in message
    assert _cache_files(folder) == [f"{kept.name}{STATE_SUFFIX}", f"{kept.name}{META_SUFFIX}"]
    assert [e.label for e in CacheStore(folder, SETTINGS).entries()] == ["kept"]
    assert store.find_exact([1, 2, 3]) is None
    assert store.store("new", PreludeKind.PRELUDE, [1, 2, 3], b"n" * 5000).label == "new"


def test_an_entry_that_failed_to_restore_can_be_discarded_and_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "cache"
    store = CacheStore(folder, SETTINGS)
    store.store("p", PreludeKind.PRELUDE, [5, 6, 7], b"old state")
    entry = store.find_exact([5, 6, 7])
    store.discard_entry(entry, "llama.cpp rejected its state")
    assert store.find_exact([5, 6, 7]) is None and _cache_files(folder) == []
    assert any("llama.cpp rejected its state" in r.getMessage() for r in caplog.records)
    store.store("p", PreludeKind.PRELUDE, [5, 6, 7], b"new state")
    fresh = CacheStore(folder, SETTINGS)
    assert fresh.load_state(fresh.find_exact([5, 6, 7])) == b"new state"


def test_discarding_an_entry_another_process_replaced_meanwhile_keeps_the_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    ours = CacheStore(folder, SETTINGS)
    ours.store("p", PreludeKind.PRELUDE, [5, 6, 7], b"old state")
    stale_entry = ours.find_exact([5, 6, 7])
    other = CacheStore(folder, SETTINGS)
    other.discard_entry(other.find_exact([5, 6, 7]), "test")
    other.store("p", PreludeKind.PRELUDE, [5, 6, 7], b"new state")
    ours.discard_entry(stale_entry, "test")
    assert CacheStore(folder, SETTINGS).load_state(ours.find_exact([5, 6, 7])) == b"new state"


# ----- the kind of an entry --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(PreludeKind))
def test_an_entry_keeps_its_kind_as_the_same_string_on_disk(tmp_path: Path, kind: PreludeKind) -> None:
    folder = tmp_path / "cache"
    entry = CacheStore(folder, SETTINGS).store("p", kind, [5, 6, 7], b"state")
    assert json.loads((folder / f"{entry.name}{META_SUFFIX}").read_text())["kind"] == kind.value
    (found,) = CacheStore(folder, SETTINGS).entries()
    assert found.kind is kind


@pytest.mark.parametrize("stored", ["mystery", 7, None, ["prelude"], "PRELUDE"])
def test_an_entry_of_an_unknown_kind_is_not_trusted_and_is_removed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, stored: object) -> None:
    folder = tmp_path / "cache"
    entry = CacheStore(folder, SETTINGS).store("p", PreludeKind.PRELUDE, [5, 6, 7], b"state")
    meta = folder / f"{entry.name}{META_SUFFIX}"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"kind": stored}))
    store = CacheStore(folder, SETTINGS)
    assert store.find_exact([5, 6, 7]) is None and store.entries() == []
    assert _cache_files(folder) == []
    assert any(f"its kind {stored!r} is none of prelude, draft, external" in r.getMessage()
               for r in caplog.records)
