"""The on-disk prelude cache (`llm_cache/`).

An entry is two files named `<label>.<digest>`:
  - `.kv`   the raw bytes of `llama_state_seq_get_data` for one sequence (no logits);
  - `.meta.json` metadata: format version, state settings (model fingerprint, KV type, llama.cpp
            version), the prelude's tokens, and the size and SHA-256 of the `.kv` file.
The `.kv` file is written first and the `.meta.json` last, both atomically, so an entry exists
only once it is complete. An entry that fails any check is reported, removed and never used.
The metadata file's mtime records when the entry was last used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from array import array
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CacheError
from .fsutil import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_SUFFIX = ".kv"
META_SUFFIX = ".meta.json"
DIGEST_CHARS = 20
DEFAULT_HOT_BYTES = 1 << 30


@dataclass(frozen=True)
class StateSettings:
    """Everything besides the tokens that changes the bytes of a prelude's state."""

    model_sha256: str
    kv_type: str
    llama_cpp_version: str
    state_layout: str = "seq-state-v1"

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Entry:
    """Metadata of one cache entry; `tokens` are the prelude's tokens, the state holds
    all but the last one (the last is decoded with the prompt, see runner.py)."""

    label: str
    kind: str
    tokens: list[int]
    settings: dict[str, Any]
    settings_key: str
    state_bytes: int
    state_sha256: str
    model_path: str = ""
    created: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION
    name: str = ""
    last_used: float = 0.0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def tokens_digest(settings_key: str, tokens: list[int]) -> str:
    hasher = hashlib.sha256(settings_key.encode())
    hasher.update(array("i", tokens).tobytes())
    return hasher.hexdigest()[:DIGEST_CHARS]


def slug(label: str) -> str:
    """A file-name-safe form of a label (letters of any script, digits, - _ kept)."""
    cleaned = re.sub(r"[^\w\-]+", "_", label, flags=re.UNICODE).strip("_.")
    return cleaned[:60] or "prelude"


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CacheStore:
    """Entries of one cache folder, for one set of state settings."""

    def __init__(self, folder: Path, settings: StateSettings, model_path: str = "",
                 hot_bytes: int = DEFAULT_HOT_BYTES) -> None:
        self.folder = folder
        self.settings = settings
        self.settings_key = settings.key()
        self.model_path = model_path
        self._hot: OrderedDict[str, bytes | bytearray] = OrderedDict()
        self._hot_limit = hot_bytes
        self.disk_reads = 0
        self.disk_writes = 0

    # ----- lookup -------------------------------------------------------------------

    def entries(self, *, all_settings: bool = False) -> list[Entry]:
        """Complete-looking entries of this folder (only ours unless all_settings)."""
        if not self.folder.is_dir():
            return []
        found = []
        for meta_path in sorted(self.folder.glob(f"*{META_SUFFIX}")):
            entry = self._read_meta(meta_path)
            if entry is not None and (all_settings or entry.settings_key == self.settings_key):
                found.append(entry)
        return found

    def find_exact(self, tokens: list[int]) -> Entry | None:
        digest = tokens_digest(self.settings_key, tokens)
        for meta_path in self.folder.glob(f"*.{digest}{META_SUFFIX}") if self.folder.is_dir() else []:
            entry = self._read_meta(meta_path)
            if entry is not None and entry.settings_key == self.settings_key and entry.tokens == tokens:
                return entry
        return None

    def find_longest_prefix(self, tokens: list[int], minimum: int = 1) -> tuple[Entry, int] | None:
        """The entry sharing the longest token prefix with `tokens` (at least `minimum`)."""
        best: tuple[Entry, int] | None = None
        for entry in self.entries():
            shared = common_prefix_length(entry.tokens, tokens)
            if shared >= minimum and (best is None or shared > best[1]):
                best = (entry, shared)
        return best

    def _read_meta(self, meta_path: Path) -> Entry | None:
        try:
            raw = json.loads(meta_path.read_text("utf-8"))
            raw["name"] = meta_path.name[: -len(META_SUFFIX)]
            raw["last_used"] = meta_path.stat().st_mtime
            entry = Entry(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as error:
            self._discard(meta_path.name[: -len(META_SUFFIX)], f"unreadable metadata ({error})")
            return None
        if entry.format != FORMAT_VERSION:
            self._discard(entry.name, f"format {entry.format}, this version reads {FORMAT_VERSION}")
            return None
        return entry

    # ----- state bytes ----------------------------------------------------------------

    def load_state(self, entry: Entry) -> bytes | bytearray | None:
        """The entry's verified state, or None (after removing it) if it fails a check."""
        digest = entry.name.rsplit(".", 1)[-1]
        hot = self._hot.get(digest)
        if hot is not None:
            self._hot.move_to_end(digest)
            self.touch(entry)
            return hot
        path = self.folder / f"{entry.name}{STATE_SUFFIX}"
        try:
            with path.open("rb") as handle:
                data = bytearray(os.fstat(handle.fileno()).st_size)
                handle.readinto(data)
        except FileNotFoundError:
            self._discard(entry.name, "its state file is missing")
            return None
        except OSError as error:
            raise CacheError(f"cannot read cache file {path}: {error.strerror or error}") from None
        self.disk_reads += 1
        if len(data) != entry.state_bytes:
            self._discard(entry.name, f"state has {len(data)} bytes, metadata says {entry.state_bytes}")
            return None
        if hashlib.sha256(data).hexdigest() != entry.state_sha256:
            self._discard(entry.name, "state checksum mismatch (corrupted file)")
            return None
        self._remember(digest, data)
        self.touch(entry)
        return data

    def store(self, label: str, kind: str, tokens: list[int], state: bytes | bytearray) -> Entry:
        """Write a new entry atomically, then drop older entries of the same label and kind."""
        digest = tokens_digest(self.settings_key, tokens)
        name = f"{slug(label)}.{digest}"
        entry = Entry(label=label, kind=kind, tokens=list(tokens), settings=asdict(self.settings),
                      settings_key=self.settings_key, state_bytes=len(state),
                      state_sha256=hashlib.sha256(state).hexdigest(), model_path=self.model_path)
        meta = {k: v for k, v in asdict(entry).items() if k not in ("name", "last_used")}
        atomic_write(self.folder / f"{name}{STATE_SUFFIX}", [memoryview(state)], for_cache=True)
        atomic_write_text(self.folder / f"{name}{META_SUFFIX}", json.dumps(meta), for_cache=True)
        self.disk_writes += 1
        entry.name = name
        entry.last_used = time.time()
        self._remember(digest, state)
        for old in self.entries():
            if old.label == label and old.kind == kind and old.name != name:
                self.remove(old)
        return entry

    def touch(self, entry: Entry) -> None:
        try:
            os.utime(self.folder / f"{entry.name}{META_SUFFIX}")
        except OSError:
            pass  # usage time is advisory

    def remove(self, entry: Entry) -> None:
        self._remove_files(entry.name)

    def _remove_files(self, name: str) -> None:
        self._hot.pop(name.rsplit(".", 1)[-1], None)
        for suffix in (META_SUFFIX, STATE_SUFFIX):
            try:
                (self.folder / f"{name}{suffix}").unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                raise CacheError(f"cannot remove cache file {name}{suffix}: {error.strerror or error}") from None

    def _discard(self, name: str, reason: str) -> None:
        log.warning("cache entry %s is invalid (%s): removed, it will be recomputed", name, reason)
        self._remove_files(name)

    def _remember(self, digest: str, state: bytes | bytearray) -> None:
        if len(state) > self._hot_limit:
            return
        self._hot[digest] = state
        self._hot.move_to_end(digest)
        total = sum(len(v) for v in self._hot.values())
        while total > self._hot_limit and self._hot:
            _, dropped = self._hot.popitem(last=False)
            total -= len(dropped)
