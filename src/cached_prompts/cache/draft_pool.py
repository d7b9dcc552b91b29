"""A prelude's pool of earlier outputs, for n-gram drafts (local/drafting.py).

The pool of a cache entry is one more file of the entry, `<label>.<digest>.drafts`, beside
its `.kv` and `.meta.json`: removed with them (evicted, pruned, cleared, replaced), counted in
the folder's size, and a leftover without its metadata is removed like a state file without
one (store.remove_leftovers). Its JSON holds the entry's settings key and token digest, the
token ids of the most recent outputs (at most MAX_POOL_TOKENS in all, MAX_OUTPUT_TOKENS each)
and the SHA-256 of those ids, so a pool that is truncated, edited, made for another model or
copied beside another entry fails a check: it is then ignored with a warning, removed, and
rebuilt from the outputs of the runs that follow. Its tokens are also checked against the
vocabulary before a draft can use them. Writers take `.locks/<digest>.drafts.lock` around
their read-modify-write, so two processes adding outputs at once both keep theirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from cached_prompts.errors import CacheError, CacheWriteError
from cached_prompts.fs import locks
from cached_prompts.fs.files import atomic_write_text
from cached_prompts.fs.regular import NotRegularFileError, read_regular

log = logging.getLogger(__name__)

DRAFTS_SUFFIX = ".drafts"
POOL_FORMAT = 1
MAX_POOL_TOKENS = 8192
MAX_OUTPUT_TOKENS = 1024
MAX_POOL_BYTES = 16 * MAX_POOL_TOKENS + 4096  # token ids of up to 7 digits and a separator, plus the header


class InvalidPool(Exception):
    """A pool file fails a check; the message is the reason."""


def pool_file(folder: Path, entry_name: str) -> Path:
    return folder / f"{entry_name}{DRAFTS_SUFFIX}"


def outputs_sha256(outputs: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(outputs, separators=(",", ":")).encode()).hexdigest()


class DraftPool:
    """The pools of one cache folder's entries made with one set of state settings."""

    def __init__(self, folder: Path, settings_key: str, n_vocab: int) -> None:
        self.folder, self.settings_key, self.n_vocab = folder, settings_key, n_vocab

    def read(self, entry_name: str) -> list[list[int]]:
        """The entry's earlier outputs, oldest first; [] if it has no pool or an invalid one
        (which is removed with a warning)."""
        path = pool_file(self.folder, entry_name)
        try:
            return self._parse(path, entry_name)
        except FileNotFoundError:
            return []
        except InvalidPool as problem:
            log.warning("draft pool %s is invalid (%s): ignored and removed; it is rebuilt from the "
                        "outputs that follow", path.name, problem)
            path.unlink(missing_ok=True)
            return []

    def add(self, entry_name: str, outputs: list[list[int]]) -> None:
        """Append outputs (the newest last) to the entry's pool, dropping the oldest beyond
        the bounds; an output already in it moves to the end. A pool that cannot be written
        (a full disk) costs the pool, not the run."""
        digest = entry_name.rsplit(".", 1)[-1]
        lock = self.folder / ".locks" / f"{digest}{DRAFTS_SUFFIX}.lock"
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            with locks.held(lock):
                kept = [o for o in self.read(entry_name) if o not in outputs]
                self._write(entry_name, _bounded(kept + [o[:MAX_OUTPUT_TOKENS] for o in outputs if o]))
        except (OSError, CacheError) as error:
            log.warning("the draft pool of %s was not updated: %s; going on without it", entry_name,
                        getattr(error, "strerror", None) or error)

    def _parse(self, path: Path, entry_name: str) -> list[list[int]]:
        try:
            data, _ = read_regular(path, MAX_POOL_BYTES)  # no link, no FIFO, bounded
            raw = json.loads(data.decode("utf-8"))
        except NotRegularFileError as error:
            raise InvalidPool(f"it {error.strerror}") from None
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as error:
            raise InvalidPool(f"unreadable: {error}") from None
        if not isinstance(raw, dict) or raw.get("format") != POOL_FORMAT:
            raise InvalidPool("not a draft pool of this version")
        if raw.get("settings_key") != self.settings_key or raw.get("digest") != entry_name.rsplit(".", 1)[-1]:
            raise InvalidPool("made for another cache entry or model")
        outputs = raw.get("outputs")
        if not isinstance(outputs, list) or not all(isinstance(o, list) for o in outputs):
            raise InvalidPool("its outputs are not lists of tokens")
        if raw.get("sha256") != outputs_sha256(outputs):
            raise InvalidPool("checksum mismatch (corrupted file)")
        if sum(len(o) for o in outputs) > MAX_POOL_TOKENS or any(len(o) > MAX_OUTPUT_TOKENS for o in outputs):
            raise InvalidPool("larger than a pool may be")
        if not all(type(t) is int and 0 <= t < self.n_vocab for o in outputs for t in o):
            raise InvalidPool("it holds tokens this model does not have")
        return outputs

    def _write(self, entry_name: str, outputs: list[list[int]]) -> None:
        data = {"format": POOL_FORMAT, "settings_key": self.settings_key, "digest": entry_name.rsplit(".", 1)[-1],
                "sha256": outputs_sha256(outputs), "outputs": outputs}
        try:
            atomic_write_text(pool_file(self.folder, entry_name), json.dumps(data, separators=(",", ":")),
                              for_cache=True)
        except CacheWriteError as error:
            raise CacheError(str(error)) from None


def _bounded(outputs: list[list[int]]) -> list[list[int]]:
    """The newest outputs that fit MAX_POOL_TOKENS together."""
    total, start = 0, len(outputs)
    while start > 0 and total + len(outputs[start - 1]) <= MAX_POOL_TOKENS:
        start -= 1
        total += len(outputs[start])
    return outputs[start:]
