"""watch: make every stale output, then watch the workspace and make again what becomes stale.

A round runs the two output commands (outputs_for_drafts, outputs_test_prompts) as they would
run from the command line: they judge freshness, so a round makes exactly the outputs that are
stale (an input changed, an output was deleted, a new input appeared) and leaves the rest.
Then, where expectations exist (any `NAME.expect.toml`), it checks the outputs as `check` does
(commands/check.py), says the table on stderr and hands the report to the listener (the live
page's marks). Expectations are not inputs of freshness: a change to an `.expect.toml` alone
starts a check round, which makes nothing (RoundKind.CHECK).

Files are watched with watchfiles (inotify where there is one). What counts:
  - `*.txt` inputs and their sidecars (`.schema.json`, `.gbnf`) in the three input folders,
    and their expectations (`.expect.toml`: a check round); outputs deleted from the two output
    folders (outputs written, by this run or anyone, need no round: they are only shown again);
  - never editors' scratch files: names starting with `.` or `#` (vim's `.x.swp`, emacs's
    `.#x` lock and `#x#` autosave), ending with `~`, vim's `4913` probe, temp files.
Changes are grouped until the folder has been quiet for STEP_MS (at most DEBOUNCE_MS), so an
editor's save (truncate + write, or write a temp file + rename) is one change.

An input that changes while its outputs are being made: those outputs are *not written*. The
watcher abandons them as soon as a decode step sees the change (run_events.ChangeCheck, every
0.25 s), and the round that the change starts makes them again from the new text; the plain
commands finish them and do not write them (each input's size and modification time when it
was read are compared with those at the moment of writing). Writing them and marking them stale
would leave outputs that look fresh (newer than the input) but answer the old text. A file
half-written when read is the same case: the rest of the write changes it again. Deleted inputs leave their outputs alone (the report lists them as
outputs whose input is gone); a renamed input is a new input whose outputs are made.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cached_prompts.backend.interface import Backend
from cached_prompts.commands.check import CheckReport, check_with_backend, render_text
from cached_prompts.commands.outputs import output_keys, outputs_for_drafts, outputs_test_prompts
from cached_prompts.commands.run_events import RunObserver
from cached_prompts.errors import CachedPromptsError, InputFileError, InputsChangedError
from cached_prompts.method.expectations import EXPECT_SUFFIX
from cached_prompts.options import SamplingOptions
from cached_prompts.workspace.layout import (CONFIG_FILE, DRAFTS, DRAFTS_OUTPUTS, PRELUDES, TEST_PROMPTS,
                                             TEST_PROMPTS_OUTPUTS, Workspace, remove_stale_output_temp_files)
from cached_prompts.workspace.outputs import all_output_sets

log = logging.getLogger(__name__)

INPUT_FOLDERS = (DRAFTS, PRELUDES, TEST_PROMPTS)
OUTPUT_FOLDERS = (DRAFTS_OUTPUTS, TEST_PROMPTS_OUTPUTS)
WATCHED_SUFFIXES = (".txt", ".json", ".gbnf", ".toml")
EDITOR_SCRATCH_NAMES = frozenset({"4913"})  # vim writes and removes it to test the folder
STEP_MS = 100  # quiet time that ends a group of changes
DEBOUNCE_MS = 1500  # the longest a group of changes waits


class WatchedKind(str, enum.Enum):
    """What a changed file is to the watcher."""

    INPUT = "input"  # an input or its schema/grammar sidecar: a round makes what became stale
    EXPECTATIONS = "expectations"  # NAME.expect.toml: the outputs are checked again, nothing is made
    OUTPUT = "output"  # deleted: made again; written: only shown again
    CONFIG = "config"  # cached-prompts.toml: said, not used (watch keeps its options)


class RoundKind(enum.Enum):
    MAKE = "make"  # make what is stale, then check
    CHECK = "check"  # only expectations changed: check again


class WatchListener(RunObserver):
    """Hears the watcher too: rounds, changes on disk, problems. The live page implements it.
    `changed` comes from the file-watching thread, everything else from the round's thread."""

    abandon_when_inputs_change = True  # the next round makes them from the new text

    def changed(self, paths: list[Path]) -> None:
        """Workspace files changed on disk (inputs or outputs)."""

    def round_started(self, stale: list[tuple[Path, str]]) -> None:
        """A round begins; it makes `stale` (each output with why it is made; none in a check round)."""

    def round_finished(self, result: "RoundResult") -> None:
        """A round ended, with what it wrote and skipped and the outputs' check."""

    def idle(self) -> None:
        """Called every few tenths of a second while waiting for changes, on the round's thread
        (the one that may use the backend)."""


@dataclass
class RoundResult:
    kind: RoundKind = RoundKind.MAKE
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # inputs a command skipped, and why
    problem: str = ""  # an error that stopped the round (the watcher goes on)
    seconds: float = 0.0
    check: CheckReport | None = None  # the outputs against their expectations; None: no input has any


@dataclass(frozen=True)
class WatchSettings:
    """What each round makes: N sampled outputs per input, or one greedy per test prompt."""

    n: int = 5
    deterministic: bool = False
    step_ms: int = STEP_MS
    debounce_ms: int = DEBOUNCE_MS


def watched_kind(root: Path, path: Path) -> WatchedKind | None:
    """What `path` is to the watcher, or None (not a file it cares about)."""
    name = path.name
    if path.parent.parent != root:
        return WatchedKind.CONFIG if path == root / CONFIG_FILE else None
    if (name.startswith((".", "#")) or name.endswith("~") or name in EDITOR_SCRATCH_NAMES
            or not name.endswith(WATCHED_SUFFIXES)):
        return None
    folder = path.parent.name
    if folder in INPUT_FOLDERS:
        return WatchedKind.EXPECTATIONS if name.endswith(EXPECT_SUFFIX) else WatchedKind.INPUT
    return WatchedKind.OUTPUT if folder in OUTPUT_FOLDERS else None


def make_round(workspace: Workspace, backend: Backend, sampling: SamplingOptions, settings: WatchSettings,
               listener: WatchListener, kind: RoundKind = RoundKind.MAKE) -> RoundResult:
    """Make every stale output of the workspace, as the two output commands would (a CHECK
    round makes nothing), then check the outputs where expectations exist."""
    stale = stale_outputs(workspace, backend, sampling, settings) if kind is RoundKind.MAKE else []
    if stale:
        log.info("%d output%s to make: %s", len(stale), "" if len(stale) == 1 else "s",
                 "; ".join(f"{path.name} ({why})" for path, why in stale[:5]) + (" ..." if len(stale) > 5 else ""))
    listener.round_started(stale)
    started = time.monotonic()
    result = RoundResult(kind)
    if kind is RoundKind.MAKE:
        _make(workspace, backend, sampling, settings, listener, result)
    result.check = check_outputs(workspace, backend, sampling)
    result.seconds = time.monotonic() - started
    listener.round_finished(result)
    return result


def _make(workspace: Workspace, backend: Backend, sampling: SamplingOptions, settings: WatchSettings,
          listener: WatchListener, result: RoundResult) -> None:
    try:
        for report in (outputs_for_drafts(workspace, backend, sampling, settings.n, False, observer=listener),
                       outputs_test_prompts(workspace, backend, sampling, settings.n, settings.deterministic,
                                            False, observer=listener)):
            result.written += report.written
            result.skipped += report.skipped
    except InputsChangedError as error:  # the round that the change starts makes them again
        log.info("%s: they are made again from the new text", error)
    except CachedPromptsError as error:  # a server down, a full disk...: said, and tried again on the next change
        log.error("%s", error)
        result.problem = str(error)


def check_outputs(workspace: Workspace, backend: Backend, sampling: SamplingOptions) -> CheckReport | None:
    """The outputs against their expectations, as `check` judges them with this run's model,
    options and draft mode, its table said on stderr; None where no input has expectations."""
    try:
        if not has_expectations(workspace):
            return None
        report = check_with_backend(workspace, backend, sampling)
    except (CachedPromptsError, OSError) as error:  # a folder removed meanwhile: checked again on the next change
        log.error("checking the outputs: %s", error)
        return None
    log.info("check:\n%s", render_text(report))
    return report


def has_expectations(workspace: Workspace) -> bool:
    """Whether any input folder holds an expectations file (NAME.expect.toml)."""
    return any(next(workspace.folder(name).glob(f"*{EXPECT_SUFFIX}"), None) is not None
               for name in INPUT_FOLDERS if workspace.folder(name).is_dir())


def stale_outputs(workspace: Workspace, backend: Backend, sampling: SamplingOptions,
                  settings: WatchSettings) -> list[tuple[Path, str]]:
    """The outputs a round makes, with why (OutputSet's verdicts, as the commands judge them:
    a set with one stale output is made again whole). Inputs that cannot be judged are left to
    the commands, which skip them with the reason."""
    found = []
    sets = all_output_sets(workspace, draft_keys=output_keys(settings.n, False),
                           prompt_keys=output_keys(settings.n, settings.deterministic))
    for output_set in sets:
        try:
            verdict = output_set.judge(sampling, backend.model_id, backend.draft)
        except (InputFileError, OSError):
            continue
        if verdict.stale:
            why = next(v.describe() for v in verdict.verdicts if not v.fresh)
            found += [(v.path, v.describe() or why) for v in verdict.verdicts]
    return found


def watch_workspace(workspace: Workspace, backend: Backend, sampling: SamplingOptions, settings: WatchSettings,
                    listener: WatchListener, stop: threading.Event) -> None:
    """Make what is stale, then again after every change, until `stop` is set (or Ctrl-C:
    KeyboardInterrupt goes through, after the file watcher has stopped). A write interrupted
    by Ctrl-C removes its temp file (fs/files.py); leftovers of killed runs are removed too."""
    changes: queue.Queue[RoundKind] = queue.Queue()
    watcher = threading.Thread(target=_watch_files, args=(workspace.root, settings, changes, stop, listener),
                               name="cached-prompts-watchfiles", daemon=True)
    watcher.start()
    try:
        kind: RoundKind | None = RoundKind.MAKE
        while kind is not None and not stop.is_set():
            make_round(workspace, backend, sampling, settings, listener, kind)
            kind = _wait_for_changes(changes, stop, listener)
    finally:
        stop.set()
        watcher.join(timeout=5)
        remove_stale_output_temp_files(workspace)


def _wait_for_changes(changes: "queue.Queue[RoundKind]", stop: threading.Event,
                      listener: WatchListener) -> RoundKind | None:
    """Block until a change that needs a round (its kind), or until stopped (None). The short
    timeout lets Ctrl-C through: a blocked Queue.get would hold the signal back."""
    while not stop.is_set():
        try:
            kinds = {changes.get(timeout=0.25)}
        except queue.Empty:
            listener.idle()
            continue
        while not changes.empty():  # everything queued meanwhile is one round
            kinds.add(changes.get_nowait())
        return RoundKind.MAKE if RoundKind.MAKE in kinds else RoundKind.CHECK
    return None


def _watch_files(root: Path, settings: WatchSettings, changes: "queue.Queue[RoundKind]", stop: threading.Event,
                 listener: WatchListener) -> None:
    import watchfiles

    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # not "N changes detected" for each

    def wanted(change: watchfiles.Change, path: str) -> bool:
        return watched_kind(root, Path(path)) is not None

    try:
        for batch in watchfiles.watch(root, watch_filter=wanted, step=settings.step_ms, debounce=settings.debounce_ms,
                                      stop_event=stop, raise_interrupt=False):
            paths = sorted({Path(path) for _, path in batch})
            needs = _round_needed(root, batch)
            log.debug("changed: %s", ", ".join(p.name for p in paths))
            listener.changed(paths)
            if needs is not None:
                changes.put(needs)
    except Exception as error:  # noqa: BLE001 - the watcher's thread must say why it stopped
        log.error("watching %s stopped: %s; restart watch", root, error)


def _round_needed(root: Path, batch: set[tuple[object, str]]) -> RoundKind | None:
    """The round a batch of changes needs: MAKE if an input changed or an output was deleted,
    CHECK if only expectations changed, None if none."""
    import watchfiles

    needs: RoundKind | None = None
    for change, path in batch:
        kind = watched_kind(root, Path(path))
        if kind is WatchedKind.CONFIG:
            log.warning("%s changed: watch keeps the options it started with; restart it to use the new ones",
                        CONFIG_FILE)
        elif kind is WatchedKind.INPUT or (kind is WatchedKind.OUTPUT and change == watchfiles.Change.deleted):
            needs = RoundKind.MAKE
        elif kind is WatchedKind.EXPECTATIONS and needs is None:
            needs = RoundKind.CHECK
    return needs
