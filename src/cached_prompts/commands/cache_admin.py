"""The `cache` commands: list entries, show the total size, prune to a size, clear.

They work on the folder as a whole, for every model and setting, and never load a model:
`list` only fingerprints the configured model file (memoized) to mark the entries it can use.
`list` and `size` change nothing: an entry they cannot read (another format version, damaged
metadata, a planted file) is reported, not removed; `prune` and `clear` remove such entries.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cached_prompts.cache.store import (Entry, clear_folder, entry_size, evict_lru, files_size, folder_size,
                    format_bytes, meta_file, remover, scan)
from cached_prompts.errors import ModelError, OptionsError
from cached_prompts.local.model_file import fingerprint_model, resolve_model_path
from cached_prompts.options import EngineOptions, parse_size

log = logging.getLogger(__name__)

ACTIONS = {
    "list": "list the cache entries: label, kind, model, tokens, size, last use",
    "size": "show the total size of the cache folder and its limit",
    "prune": "evict least recently used entries until the folder fits a size",
    "clear": "remove every cache entry (of every model)",
}


@dataclass
class CacheItem:
    """One entry as the `cache` commands show it."""

    name: str
    label: str
    kind: str
    model_file: str
    model_sha256: str
    kv_type: str
    tokens: int
    size_bytes: int
    last_used: float
    usable: bool | None  # with the configured model and settings; None: unknown
    problem: str = ""  # why the entry cannot be read; such an entry is usable by no run

    @classmethod
    def of(cls, folder: Path, entry: Entry, current_key: str | None) -> CacheItem:
        return cls(name=entry.name, label=entry.label, kind=entry.kind.value,
                   model_file=Path(entry.model_path).name if entry.model_path else "",
                   model_sha256=str(entry.settings.get("model_sha256", "")),
                   kv_type=str(entry.settings.get("kv_type", "")), tokens=entry.n_tokens,
                   size_bytes=entry_size(folder, entry), last_used=entry.last_used,
                   usable=None if current_key is None else entry.settings_key == current_key)

    @classmethod
    def unreadable(cls, folder: Path, name: str, problem: str) -> CacheItem:
        try:
            last_used = os.lstat(meta_file(folder, name)).st_mtime
        except FileNotFoundError:
            last_used = 0.0
        return cls(name=name, label=name.rsplit(".", 1)[0], kind="", model_file="", model_sha256="",
                   kv_type="", tokens=0, size_bytes=files_size(folder, name), last_used=last_used,
                   usable=False, problem=problem)


@dataclass
class SizeReport:
    folder: str
    entries: int
    entry_bytes: int
    total_bytes: int
    limit_bytes: int
    unreadable: int = 0  # entries that cannot be read (counted in total_bytes only)


@dataclass
class RemovalReport:
    folder: str
    removed: list[CacheItem] = field(default_factory=list)
    freed_bytes: int = 0
    total_bytes: int = 0


def current_settings_key(options: EngineOptions, folder: Path) -> str | None:
    """The settings key the configured model would use, or None if there is no model."""
    try:
        model_path = resolve_model_path(options.model_path)
    except ModelError as error:
        log.warning("cannot tell which entries the configured model can use: %s", error)
        return None
    fingerprint = fingerprint_model(model_path, folder if folder.is_dir() else None)
    from cached_prompts.local.engine import state_settings  # no model is loaded

    return state_settings(options, fingerprint.sha256).key()


def read_only_scan(folder: Path) -> tuple[list[Entry], dict[str, str]]:
    """The readable entries and, by name, why each of the others cannot be read; removes nothing."""
    unreadable: dict[str, str] = {}
    entries = scan(folder, unreadable.__setitem__)
    return entries, unreadable


def list_entries(folder: Path, current_key: str | None) -> list[CacheItem]:
    """Every entry, readable or not, most recently used first."""
    entries, unreadable = read_only_scan(folder)
    items = [CacheItem.of(folder, entry, current_key) for entry in entries]
    items += [CacheItem.unreadable(folder, name, problem) for name, problem in unreadable.items()]
    return sorted(items, key=lambda item: (-item.last_used, item.name))


def size_report(folder: Path, limit_bytes: int) -> SizeReport:
    entries, unreadable = read_only_scan(folder)
    return SizeReport(str(folder), len(entries), sum(entry_size(folder, e) for e in entries),
                      folder_size(folder), limit_bytes, len(unreadable))


def prune(folder: Path, max_bytes: int) -> RemovalReport:
    """Remove the unreadable entries, then the least recently used ones down to `max_bytes`."""
    if not folder.is_dir():
        return RemovalReport(str(folder))
    before = {entry.name: CacheItem.of(folder, entry, None) for entry in scan(folder, remover(folder))}
    removed, total = evict_lru(folder, max_bytes)
    items = [before.get(entry.name) or CacheItem.of(folder, entry, None) for entry in removed]
    return RemovalReport(str(folder), items, sum(item.size_bytes for item in items), total)


def clear(folder: Path) -> RemovalReport:
    before = {entry.name: CacheItem.of(folder, entry, None) for entry in scan(folder, remover(folder))}
    removed = clear_folder(folder) if folder.is_dir() else []
    items = [before[entry.name] for entry in removed if entry.name in before]
    return RemovalReport(str(folder), items, sum(item.size_bytes for item in items), folder_size(folder))


def parse_max_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise OptionsError(f"--max-size: {error}") from None


# ----- rendering ---------------------------------------------------------------------------


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def render_list(folder: Path, items: list[CacheItem], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(item) | {"last_used_iso": _when(item.last_used)} for item in items],
                          ensure_ascii=False, indent=1)
    if not items:
        return f"{folder} has no cache entries"
    rows = [("", "LAST USED", "KIND", "TOKENS", "SIZE", "MODEL", "KV", "LABEL")]
    for item in items:
        if item.problem:
            rows.append(("!", _when(item.last_used), "unreadable", "", format_bytes(item.size_bytes), "", "",
                         f"{item.label} ({item.problem})"))
            continue
        mark = {True: "*", False: "", None: "?"}[item.usable]
        model = item.model_file or f"sha256 {item.model_sha256[:12]}"
        rows.append((mark, _when(item.last_used), item.kind, str(item.tokens),
                     format_bytes(item.size_bytes), model, item.kv_type, item.label))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.rjust(w) if i in (3, 4) else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) + "  " + row[-1]
             for row in rows]
    readable = [item for item in items if not item.problem]
    total = sum(item.size_bytes for item in readable)
    unreadable = len(items) - len(readable)
    also = (f"; {unreadable} unreadable (another format version or damaged; no run uses them, "
            "`cache prune` removes them)") if unreadable else ""
    lines.append(f"{_count(len(readable), 'entry', 'entries')}, {format_bytes(total)}; "
                 f"* = usable with the configured model and KV type{also}")
    return "\n".join(lines)


def render_size(report: SizeReport, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(report), ensure_ascii=False, indent=1)
    also = f"; {report.unreadable} unreadable" if report.unreadable else ""
    return (f"{report.folder}: {format_bytes(report.total_bytes)} in total "
            f"({_count(report.entries, 'entry', 'entries')}, {format_bytes(report.entry_bytes)}{also}); "
            f"limit {format_bytes(report.limit_bytes)}")


def render_removal(report: RemovalReport, as_json: bool) -> str:
    if as_json:
        return json.dumps(asdict(report), ensure_ascii=False, indent=1)
    lines = [f"removed {item.label} ({item.kind}, {item.tokens} tokens, {format_bytes(item.size_bytes)})"
             for item in report.removed]
    lines.append(f"{_count(len(report.removed), 'entry', 'entries')} removed, "
                 f"{format_bytes(report.freed_bytes)} freed; {report.folder} now takes "
                 f"{format_bytes(report.total_bytes)}")
    return "\n".join(lines)


def run(action: str, folder: Path, options: EngineOptions, *, max_size: str | None = None,
        as_json: bool = False) -> str:
    """One `cache` command's output text."""
    if action == "list":
        return render_list(folder, list_entries(folder, current_settings_key(options, folder)), as_json)
    if action == "size":
        return render_size(size_report(folder, options.cache_max_bytes), as_json)
    if action == "prune":
        limit = parse_max_size(max_size) if max_size is not None else options.cache_max_bytes
        return render_removal(prune(folder, limit), as_json)
    if action == "clear":
        return render_removal(clear(folder), as_json)
    raise OptionsError(f"unknown cache command {action!r}; use one of {', '.join(ACTIONS)}")
