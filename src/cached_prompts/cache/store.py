"""The on-disk prelude cache (`llm_cache/`).

An entry is two files named `<label>.<digest>`:
  - `.kv`   the raw bytes of `llama_state_seq_get_data` for one sequence (no logits);
  - `.meta.json` metadata: format version, state settings (model fingerprint, KV type, llama.cpp
            version), the prelude's tokens, and the size and SHA-256 of the `.kv` file.
The `.kv` file is written first and the `.meta.json` last, both atomically, so an entry exists
only once it is complete; removal goes the other way. An entry that fails any check is never
used: a run that meets it removes it (it is recomputed), read-only commands only report it.
The metadata file's mtime records when the entry was last used; the folder is kept under a
size limit by evicting the least recently used entries.

The folder is untrusted (fsutil.py): files are opened without following links and must be
regular, metadata is read up to META_MAX_BYTES and a state file up to the size its metadata
promises, so a planted link, FIFO or device neither hangs a reader nor exhausts its memory.

Locks (see locks.py): `.locks/<digest>.lock` is held while one process checks, computes and
stores an entry, so another process needing the same prelude waits and then reuses it;
`.lock` is held while entries are evicted, pruned or cleared. No lock spans a whole run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cached_prompts.fs import locks
from cached_prompts.backend.interface import PreludeKind
from cached_prompts.cache.draft_pool import DRAFTS_SUFFIX, pool_file
from cached_prompts.errors import CacheError, CacheWriteError
from cached_prompts.fs.files import atomic_write, atomic_write_text, remove_stale_temp_files
from cached_prompts.fs.regular import NotRegularFileError, open_regular, read_regular

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_SUFFIX = ".kv"
META_SUFFIX = ".meta.json"
DIGEST_CHARS = 20
DEFAULT_HOT_BYTES = 1 << 30
DEFAULT_MAX_BYTES = 4 << 30
LOCKS_DIR = ".locks"
FOLDER_LOCK = ".lock"
# Metadata is mostly the token list, about 8 bytes a token: room for 4M tokens.
META_MAX_BYTES = 32 << 20
_LOCAL_FIELDS = ("name", "last_used", "meta_inode")  # known from the files, not stored
_SHA256 = re.compile(r"[0-9a-f]{64}")


def settings_key_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StateSettings:
    """Everything besides the tokens that changes the bytes of a prelude's state."""

    model_sha256: str
    kv_type: str
    llama_cpp_version: str
    device: str = "cpu"  # where it was computed: "cpu", "gpu:all", "gpu:LAYERS" (engine.compute_setup)
    batching: str = ""  # "N_BATCH/N_UBATCH" it was computed with (engine.compute_setup)
    weights: str = "repacked"  # "repacked" or "plain" (--lp-repack): repacked kernels round otherwise
    state_layout: str = "seq-state-v1"

    def key(self) -> str:
        return settings_key_of(asdict(self))


@dataclass
class Entry:
    """Metadata of one cache entry; `tokens` are the prelude's tokens, the state holds
    all but the last one (the last is decoded with the prompt, see runner.py)."""

    label: str
    kind: PreludeKind  # stored as its value ("prelude", "external"...)
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
    meta_inode: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def digest(self) -> str:
        return self.name.rsplit(".", 1)[-1]


class InvalidEntry(Exception):
    """An entry's metadata fails a check; the message is the reason."""


def tokens_digest(settings_key: str, tokens: list[int]) -> str:
    hasher = hashlib.sha256(settings_key.encode())
    hasher.update(array("i", tokens).tobytes())
    return hasher.hexdigest()[:DIGEST_CHARS]


def slug(label: str) -> str:
    """A file-name-safe form of a label (letters of any script, digits, - _ kept). Where that
    form loses something ("a b" and "a?b", or a cut after 60 characters), a hash of the whole
    label is added, so two labels never share a file name."""
    cleaned = re.sub(r"[^\w\-]+", "_", label, flags=re.UNICODE).strip("_.")[:60] or "prelude"
    if cleaned == label:
        return cleaned
    return f"{cleaned}-{hashlib.sha256(label.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


# ----- reading and checking metadata --------------------------------------------------------


def meta_file(folder: Path, name: str) -> Path:
    return folder / f"{name}{META_SUFFIX}"


def state_file(folder: Path, name: str) -> Path:
    return folder / f"{name}{STATE_SUFFIX}"


def parse_meta(path: Path) -> Entry:
    """The entry described by a `.meta.json` file; raises InvalidEntry if any check of the
    metadata fails, FileNotFoundError if it was removed meanwhile."""
    try:
        data, info = read_regular(path, META_MAX_BYTES)
        raw = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise
    except NotRegularFileError as error:
        raise InvalidEntry(f"unreadable metadata (it {error.strerror})") from None
    except (OSError, ValueError) as error:
        raise InvalidEntry(f"unreadable metadata ({error})") from None
    if not isinstance(raw, dict) or any(key in raw for key in _LOCAL_FIELDS):
        raise InvalidEntry("metadata is not an entry's")
    if raw.get("format") != FORMAT_VERSION:
        raise InvalidEntry(f"format {raw.get('format')!r}, this version reads {FORMAT_VERSION}")
    try:
        entry = Entry(**{**raw, "kind": _kind_of(raw.get("kind"))}, name=path.name[: -len(META_SUFFIX)],
                      last_used=info.st_mtime, meta_inode=info.st_ino)
    except TypeError as error:
        raise InvalidEntry(f"metadata fields are wrong ({error})") from None
    problem = _metadata_problem(entry)
    if problem:
        raise InvalidEntry(problem)
    return entry


def _kind_of(raw: Any) -> PreludeKind:
    """The kind a metadata file names; one this version does not know fails the checks."""
    try:
        return PreludeKind(raw)
    except ValueError:
        known = ", ".join(kind.value for kind in PreludeKind)
        raise InvalidEntry(f"its kind {raw!r} is none of {known}") from None


def meta_json(entry: Entry) -> str:
    """The `.meta.json` text of an entry: its stored fields, the kind as its value."""
    meta = {k: v for k, v in asdict(entry).items() if k not in _LOCAL_FIELDS}
    meta["kind"] = entry.kind.value
    return json.dumps(meta)


def _metadata_problem(entry: Entry) -> str | None:
    if not isinstance(entry.tokens, list) or not entry.tokens \
            or not all(type(t) is int for t in entry.tokens):
        return "its tokens are not a list of numbers"
    if not isinstance(entry.settings, dict) or settings_key_of(entry.settings) != entry.settings_key:
        return "its settings do not match their key"
    if tokens_digest(entry.settings_key, entry.tokens) != entry.digest:
        return "its tokens do not match its file name"
    if type(entry.state_bytes) is not int or entry.state_bytes <= 0 \
            or not isinstance(entry.state_sha256, str) or not _SHA256.fullmatch(entry.state_sha256):
        return "its state size or checksum is malformed"
    if not isinstance(entry.label, str):
        return "its label is malformed"
    return None


def discard(folder: Path, name: str, reason: str) -> None:
    log.warning("cache entry %s is invalid (%s): removed, it will be recomputed", name, reason)
    remove_entry_files(folder, name)


def remove_entry_files(folder: Path, name: str) -> None:
    """Metadata first: from then on the entry does not exist for any reader. Its draft pool
    (draft_pool.py) goes with it."""
    for path in (meta_file(folder, name), state_file(folder, name), pool_file(folder, name)):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            raise CacheError(f"cannot remove cache file {path}: {error.strerror or error}; "
                             "make the cache folder writable") from None


InvalidHandler = Callable[[str, str], None]  # (entry name, reason)


def remover(folder: Path) -> InvalidHandler:
    """An `on_invalid` for scan that removes failing entries with a warning: for runs and
    for commands whose job is removing (prune, clear), never for read-only ones."""
    return lambda name, reason: discard(folder, name, reason)


def scan(folder: Path, on_invalid: InvalidHandler) -> list[Entry]:
    """Every entry of the folder whose metadata passes the checks, any settings, by name.
    Entries that fail are passed to `on_invalid` (`remover(folder)` to remove them)."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob(f"*{META_SUFFIX}")):
        try:
            found.append(parse_meta(path))
        except FileNotFoundError:
            continue
        except InvalidEntry as problem:
            on_invalid(path.name[: -len(META_SUFFIX)], str(problem))
    return found


# ----- folder-wide upkeep ---------------------------------------------------------------------


def entry_lock_path(folder: Path, digest: str) -> Path:
    return folder / LOCKS_DIR / f"{digest}.lock"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Serializes eviction, prune and clear between processes."""
    folder.mkdir(parents=True, exist_ok=True)
    with locks.held(folder / FOLDER_LOCK):
        yield


def entry_size(folder: Path, entry: Entry) -> int:
    return files_size(folder, entry.name)


def files_size(folder: Path, name: str) -> int:
    """Bytes of the regular files of the entry `name` (a link counts nothing)."""
    return sum(_regular_size(path) for path in (meta_file(folder, name), state_file(folder, name),
                                                pool_file(folder, name)))


def _regular_size(path: Path | str) -> int:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


def folder_size(folder: Path) -> int:
    """Bytes of every regular file in the cache folder, entries and bookkeeping alike."""
    total = 0
    for parent, _, names in os.walk(folder):  # links to folders are not followed
        total += sum(_regular_size(os.path.join(parent, name)) for name in names)
    return total


def remove_leftovers(folder: Path) -> list[str]:
    """Remove what killed processes leave behind: temp files of unfinished writes, a state
    file whose metadata was never written, metadata whose state file is gone. Files that a
    live process is writing (its temp file or the entry's lock is held) are left alone."""
    removed = [path.name for path in remove_stale_temp_files(folder)]
    if not folder.is_dir():
        return removed
    metas = {p.name[: -len(META_SUFFIX)] for p in folder.glob(f"*{META_SUFFIX}")}
    states = {p.name[: -len(STATE_SUFFIX)] for p in folder.glob(f"*{STATE_SUFFIX}")}
    for pool in folder.glob(f"*{DRAFTS_SUFFIX}"):  # a draft pool outlived its entry
        if pool.name[: -len(DRAFTS_SUFFIX)] not in metas:
            pool.unlink(missing_ok=True)
            removed.append(pool.name)
    if metas == states:
        return removed
    try:
        (folder / LOCKS_DIR).mkdir(exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create {folder / LOCKS_DIR}: {error.strerror or error}; "
                         "make the cache folder writable") from None
    for name in sorted(metas ^ states):
        with locks.held(entry_lock_path(folder, name.rsplit(".", 1)[-1]), blocking=False,
                        remove=True) as free:
            has_meta = os.path.lexists(meta_file(folder, name))
            has_state = os.path.lexists(state_file(folder, name))
            if not free or has_meta == has_state:
                continue
            if has_meta:
                discard(folder, name, "its state file is missing")
            else:
                remove_entry_files(folder, name)
                removed.append(name + STATE_SUFFIX)
    if removed:
        log.info("cache: removed %d leftover file(s) of interrupted runs", len(removed))
    return removed


def evict_lru(folder: Path, max_bytes: int,
              keep: frozenset[str] = frozenset()) -> tuple[list[Entry], int]:
    """Remove least recently used entries (any settings) until the folder takes at most
    `max_bytes`; entries named in `keep` stay. Returns the removed entries and the size after."""
    with folder_lock(folder):
        total = folder_size(folder)
        removed: list[Entry] = []
        if total <= max_bytes:
            return removed, total
        for entry in sorted(scan(folder, remover(folder)), key=lambda e: (e.last_used, e.name)):
            if total <= max_bytes:
                break
            if entry.name in keep:
                continue
            total -= entry_size(folder, entry)
            remove_entry_files(folder, entry.name)
            removed.append(entry)
    return removed, total


def clear_folder(folder: Path) -> list[Entry]:
    """Remove every entry (any settings) and every leftover of interrupted runs."""
    with folder_lock(folder):
        entries = scan(folder, remover(folder))
        for entry in entries:
            remove_entry_files(folder, entry.name)
        remove_leftovers(folder)
    return entries


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ----- the store of one process ------------------------------------------------------------


class CacheStore:
    """Entries of one cache folder, for one set of state settings."""

    def __init__(self, folder: Path, settings: StateSettings, model_path: str = "",
                 hot_bytes: int = DEFAULT_HOT_BYTES, max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
        self.folder = folder
        self.settings = settings
        self.settings_key = settings.key()
        self.model_path = model_path
        self.max_bytes = max_bytes
        self._hot: OrderedDict[str, bytes | bytearray] = OrderedDict()
        self._hot_limit = hot_bytes
        self._held: set[str] = set()
        self._recovered = False
        self.disk_reads = 0
        self.disk_writes = 0

    # ----- lookup -------------------------------------------------------------------

    def entries(self, *, all_settings: bool = False) -> list[Entry]:
        """Complete-looking entries of this folder (only ours unless all_settings)."""
        self._recover_once()
        return [entry for entry in scan(self.folder, self._discard)
                if all_settings or entry.settings_key == self.settings_key]

    def find_exact(self, tokens: list[int]) -> Entry | None:
        self._recover_once()
        digest = tokens_digest(self.settings_key, tokens)
        for meta_path in self.folder.glob(f"*.{digest}{META_SUFFIX}") if self.folder.is_dir() else []:
            entry = self._read_meta(meta_path)
            if entry is not None and entry.settings_key == self.settings_key and entry.tokens == tokens:
                return entry
        return None

    def _read_meta(self, meta_path: Path) -> Entry | None:
        try:
            return parse_meta(meta_path)
        except FileNotFoundError:
            return None
        except InvalidEntry as problem:
            self._discard(meta_path.name[: -len(META_SUFFIX)], str(problem))
            return None

    def _recover_once(self) -> None:
        if not self._recovered:
            self._recovered = True
            remove_leftovers(self.folder)

    # ----- locking --------------------------------------------------------------------

    @contextmanager
    def entry_lock(self, tokens: list[int], label: str = "") -> Iterator[None]:
        """Held while checking again, computing and storing the entry of `tokens`, so that
        two processes needing the same prelude compute it once. Re-entrant in a store."""
        digest = tokens_digest(self.settings_key, tokens)
        if digest in self._held:
            yield
            return
        path = entry_lock_path(self.folder, digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"cannot create {path.parent}: {error.strerror or error}; "
                             "make the cache folder writable") from None
        fd = locks.acquire(path, blocking=False)
        if fd is None:
            log.info("%s: another process is computing this prelude; waiting for it", label or digest)
            fd = locks.acquire(path)
        self._held.add(digest)
        try:
            yield
        finally:
            self._held.discard(digest)
            locks.release(fd, path)

    # ----- state bytes ----------------------------------------------------------------

    def load_state(self, entry: Entry) -> bytes | bytearray | None:
        """The entry's verified state, or None (after removing it) if it fails a check."""
        hot = self._hot.get(entry.digest)
        if hot is not None:
            self._hot.move_to_end(entry.digest)
            self.touch(entry)
            return hot
        path = state_file(self.folder, entry.name)
        try:
            data, _ = read_regular(path, entry.state_bytes)  # never more than promised
        except FileNotFoundError:
            return self._reject(entry, "its state file is missing")
        except NotRegularFileError as error:
            return self._reject(entry, f"its state file {error.strerror}")
        except OSError as error:
            raise CacheError(f"cannot read cache file {path}: {error.strerror or error}") from None
        self.disk_reads += 1
        if len(data) != entry.state_bytes:
            return self._reject(entry, f"state has {len(data)} bytes, metadata says {entry.state_bytes}")
        if hashlib.sha256(data).hexdigest() != entry.state_sha256:
            return self._reject(entry, "state checksum mismatch (corrupted file)")
        self._remember(entry.digest, data)
        self.touch(entry)
        return data

    def _reject(self, entry: Entry, reason: str) -> None:
        """Discard a failing entry, unless another process removed or replaced it since
        its metadata was read (then the mismatch is theirs, not corruption)."""
        try:
            current = meta_file(self.folder, entry.name).stat().st_ino
        except FileNotFoundError:
            current = None
        if current != entry.meta_inode:
            log.debug("cache entry %s changed while it was read; not using it", entry.name)
            return None
        self._discard(entry.name, reason)
        return None

    def store(self, label: str, kind: PreludeKind, tokens: list[int], state: bytes | bytearray) -> Entry:
        """Write a new entry atomically, drop older entries of the same label and kind,
        then keep the folder under its size limit. An existing entry is never rewritten
        (`discard_entry` first to replace one). Raises CacheWriteError, leaving nothing of
        the entry, if it cannot be written (full disk...): a run can go on without it."""
        digest = tokens_digest(self.settings_key, tokens)
        name = f"{slug(label)}.{digest}"
        with self.entry_lock(tokens, label):
            entry = self._read_meta(meta_file(self.folder, name))
            if entry is None or entry.tokens != tokens or entry.settings_key != self.settings_key:
                entry = self._write(name, label, kind, tokens, state)
            else:
                self.touch(entry)
            self._remember(digest, state)
            for old in self.entries():
                if old.label == label and old.kind == kind and old.name != name:
                    self.remove(old)
        self.enforce_limit(keep=name)
        return entry

    def _write(self, name: str, label: str, kind: PreludeKind, tokens: list[int],
               state: bytes | bytearray) -> Entry:
        entry = Entry(label=label, kind=kind, tokens=list(tokens), settings=asdict(self.settings),
                      settings_key=self.settings_key, state_bytes=len(state),
                      state_sha256=hashlib.sha256(state).hexdigest(), model_path=self.model_path)
        try:
            atomic_write(state_file(self.folder, name), [memoryview(state)], for_cache=True)
            atomic_write_text(meta_file(self.folder, name), meta_json(entry), for_cache=True)
        except CacheWriteError as error:
            # The entry lock is held: the state file, if written, is ours and has no metadata.
            state_file(self.folder, name).unlink(missing_ok=True)
            raise CacheWriteError(f"cannot store the cache entry of {label} ({len(tokens)} tokens, "
                                  f"{format_bytes(len(state))}): {error}") from None
        self.disk_writes += 1
        entry.name = name
        entry.last_used = time.time()
        try:
            entry.meta_inode = meta_file(self.folder, name).stat().st_ino
        except FileNotFoundError:
            pass  # already evicted by another process; the entry is still valid in memory
        return entry

    def enforce_limit(self, keep: str = "") -> None:
        """Evict least recently used entries beyond `max_bytes`, never the entry `keep`."""
        if self.max_bytes is None:
            return
        removed, total = evict_lru(self.folder, self.max_bytes, frozenset({keep}))
        for entry in removed:
            self._hot.pop(entry.digest, None)
        if removed:
            log.info("cache: evicted %d least recently used entr%s to stay under %s", len(removed),
                     "y" if len(removed) == 1 else "ies", format_bytes(self.max_bytes))
        if total > self.max_bytes:
            log.warning("the cache folder takes %s, more than its limit %s, even after evicting "
                        "everything but the newest entry; raise --cache-max-size",
                        format_bytes(total), format_bytes(self.max_bytes))

    def touch(self, entry: Entry) -> None:
        """Record a use in the metadata file's mtime (through its descriptor: a link planted
        in its place is not followed)."""
        try:
            fd = open_regular(meta_file(self.folder, entry.name))
        except OSError:
            return  # usage time is advisory
        try:
            os.utime(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def discard_entry(self, entry: Entry, reason: str) -> None:
        """Remove an entry found unusable after its checks passed (llama.cpp refused its
        state), with a warning, so that the state computed instead can be stored under its
        name. An entry that another process has replaced since `entry` was read is kept."""
        self._hot.pop(entry.digest, None)
        with self.entry_lock(entry.tokens, entry.label):
            current = self._read_meta(meta_file(self.folder, entry.name))
            if current is not None and (current.created, current.state_sha256) == (
                    entry.created, entry.state_sha256):
                self._discard(entry.name, reason)

    def remove(self, entry: Entry) -> None:
        self._hot.pop(entry.digest, None)
        remove_entry_files(self.folder, entry.name)

    def _discard(self, name: str, reason: str) -> None:
        self._hot.pop(name.rsplit(".", 1)[-1], None)
        discard(self.folder, name, reason)

    def _remember(self, digest: str, state: bytes | bytearray) -> None:
        if len(state) > self._hot_limit:
            return
        self._hot[digest] = state
        self._hot.move_to_end(digest)
        total = sum(len(v) for v in self._hot.values())
        while total > self._hot_limit and self._hot:
            _, dropped = self._hot.popitem(last=False)
            total -= len(dropped)
