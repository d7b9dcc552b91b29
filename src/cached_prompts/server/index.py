"""What this workspace knows about preludes kept on servers: `llm_cache/servers-index.json`.

Two tables, so that later processes (a new CLI run, another REPL) find them:
  - slot files: for (model, prelude tokens), the name of the llama-server slot file saved by
    `precache-preludes` and the servers that hold it, so a restarted server restores it;
  - named preludes: the REPL's `prelude_id`s (label, kind, model, tokens), for
    `list_preludes` and `drop_prelude`.
The file is rewritten atomically (fsutil) under a lock (locks.py); it is only read as a
regular file of bounded size, and a damaged one is reported and started afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cached_prompts.fs import locks
from cached_prompts.backend.interface import PreludeKind, StoredPrelude
from cached_prompts.fs.files import atomic_write_text
from cached_prompts.fs.regular import read_regular

log = logging.getLogger(__name__)

INDEX_FILE = "servers-index.json"
LOCK_FILE = ".locks/servers-index.lock"
FORMAT_VERSION = 1
MAX_INDEX_BYTES = 16 << 20
MAX_SLOT_FILES = 5000  # the least recently used are forgotten beyond it


def tokens_digest(tokens: Sequence[int]) -> str:
    """SHA-256 of the token ids (little-endian int32): a prelude's identity, with no model."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


def slot_file_name(model_id: str, tokens: Sequence[int]) -> str:
    """A file name llama-server accepts (letters, digits, `-`, `.`), derived from our cache
    key: the model and the prelude's tokens."""
    key = hashlib.sha256(model_id.encode("utf-8") + b"\0" + tokens_digest(tokens).encode()).hexdigest()
    return f"cached-prompts-{key[:40]}.bin"


def _empty() -> dict[str, Any]:
    return {"version": FORMAT_VERSION, "slot_files": {}, "named": []}


class ServerIndex:
    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / INDEX_FILE
        self._lock = cache_dir / LOCK_FILE

    # ----- slot files ------------------------------------------------------------------------

    def slot_servers(self, file_name: str) -> list[str]:
        """The servers that saved `file_name` in their --slot-save-path."""
        entry = self._read()["slot_files"].get(file_name)
        return list(entry.get("servers", [])) if isinstance(entry, dict) else []

    def note_slot_file(self, file_name: str, url: str, tokens: int, size: int) -> None:
        def change(data: dict[str, Any]) -> None:
            files = data["slot_files"]
            entry = files.get(file_name) if isinstance(files.get(file_name), dict) else {}
            servers = [s for s in entry.get("servers", []) if s != url] + [url]
            files[file_name] = {"servers": servers, "tokens": tokens, "bytes": size, "used": time.time()}
            for old in sorted(files, key=lambda name: files[name].get("used", 0))[:-MAX_SLOT_FILES]:
                del files[old]
        self._update(change)

    def forget_slot_file(self, file_name: str, url: str) -> None:
        def change(data: dict[str, Any]) -> None:
            entry = data["slot_files"].get(file_name)
            if isinstance(entry, dict):
                entry["servers"] = [s for s in entry.get("servers", []) if s != url]
                if not entry["servers"]:
                    del data["slot_files"][file_name]
        self._update(change)

    # ----- named preludes ----------------------------------------------------------------------

    def keep(self, label: str, kind: PreludeKind, model_id: str, tokens: Sequence[int], file_name: str) -> None:
        """Record `label` for these tokens, replacing the label's older text for this model."""
        digest = tokens_digest(tokens)

        def change(data: dict[str, Any]) -> None:
            data["named"] = [e for e in data["named"]
                             if not (e.get("label") == label and e.get("kind") == kind.value
                                     and e.get("model") == model_id)]
            data["named"].append({"label": label, "kind": kind.value, "model": model_id, "digest": digest,
                                  "tokens": len(tokens), "slot_file": file_name})
        current = [e for e in self._read()["named"] if e.get("label") == label and e.get("kind") == kind.value
                   and e.get("model") == model_id]
        if len(current) != 1 or current[0].get("digest") != digest:
            self._update(change)

    def kept(self, kind: PreludeKind, model_id: str) -> list[StoredPrelude]:
        data = self._read()
        entries = sorted((e for e in data["named"] if e.get("kind") == kind.value and e.get("model") == model_id),
                         key=lambda e: str(e.get("label")))
        return [StoredPrelude(str(e["label"]), int(e.get("tokens", 0)),
                              self._bytes(data, str(e.get("slot_file", "")))) for e in entries]

    def drop(self, label: str, kind: PreludeKind) -> int:
        """Forget the label for every model; how many entries were forgotten."""
        dropped = 0

        def change(data: dict[str, Any]) -> None:
            nonlocal dropped
            kept = [e for e in data["named"] if not (e.get("label") == label and e.get("kind") == kind.value)]
            dropped = len(data["named"]) - len(kept)
            data["named"] = kept
        self._update(change)
        return dropped

    @staticmethod
    def _bytes(data: dict[str, Any], file_name: str) -> int:
        entry = data["slot_files"].get(file_name)
        return int(entry.get("bytes", 0)) if isinstance(entry, dict) else 0

    # ----- the file -----------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            raw, _ = read_regular(self.path, MAX_INDEX_BYTES)
        except FileNotFoundError:
            return _empty()
        except OSError as error:
            log.warning("%s cannot be read (%s); starting a new one", self.path, error.strerror or error)
            return _empty()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            log.warning("%s is damaged; starting a new one", self.path)
            return _empty()
        if (not isinstance(data, dict) or data.get("version") != FORMAT_VERSION
                or not isinstance(data.get("slot_files"), dict) or not isinstance(data.get("named"), list)):
            log.warning("%s is not an index this version knows; starting a new one", self.path)
            return _empty()
        data["named"] = [e for e in data["named"] if isinstance(e, dict) and isinstance(e.get("label"), str)]
        return data

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        self._lock.parent.mkdir(parents=True, exist_ok=True)
        with locks.held(self._lock):
            data = self._read()
            change(data)
            atomic_write_text(self.path, json.dumps(data, ensure_ascii=False, indent=1), for_cache=True)
