"""One rule per output set: the outputs of one draft or test prompt, what they depend on, and
whether they must be made again.

An `OutputSet` knows
- its outputs: `NAME.output-K.txt` (K = 0, 1, ... or `deterministic`) in the input's output
  folder; the only place output file names are built;
- what they depend on: the input, its schema or grammar sidecar, a test prompt's prelude,
  the model, and the recipe (recipe.py: sampling options, max tokens, stop strings, grammar,
  draft mode);
- how to judge them (`judge`), with a `Verdict` per output: fresh, missing, or stale with
  the reason — like make (older than an input; a link in its place counts too), made by
  another model (its record names another model id), or made with another recipe.

Outputs whose record keeps no recipe (written before recipes were recorded) are judged by
time and model only: they stay fresh rather than being made again en masse after an
upgrade; the next run that remakes them for another reason records their recipe. An output
without any record (a hand-written one) is judged by time only.

The commands decide with it what to regenerate, the report shows the same verdicts with
their reasons, and the token statistics and `promote` find outputs through it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cached_prompts.backend.interface import Backend, BackendKind
from cached_prompts.errors import InputFileError
from cached_prompts.fs.regular import kind_of
from cached_prompts.options import Draft, SamplingOptions
from cached_prompts.workspace.layout import (DETERMINISTIC, DRAFTS_OUTPUTS, PRELUDE_SEPARATOR, TEST_PROMPTS_OUTPUTS,
                                             Workspace)
from cached_prompts.workspace.recipe import Grammar, OptionChange, Recipe
from cached_prompts.workspace.records import OutputRecord, read_record
from cached_prompts.workspace.sidecars import sidecar_of

OutputKey = int | str  # 0, 1, ... or DETERMINISTIC; kept as text inside an OutputSet
OUTPUT_INFIX = ".output-"
OUTPUT_SUFFIX = ".txt"


class InputKind(enum.Enum):
    DRAFT = "draft"
    TEST_PROMPT = "test prompt"


class OutputState(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"      # see StaleReason
    MISSING = "missing"  # a run would make it, it does not exist


class StaleReason(str, enum.Enum):
    OLDER = "older"                # older than an input (or a link in its place)
    OTHER_MODEL = "other-model"    # its record names another model
    OTHER_RECIPE = "other-recipe"  # its record's recipe differs from this run's options
    NOT_A_FILE = "not-a-file"      # a folder or other special file is where it goes: never writable


@dataclass(frozen=True)
class ModelIdentity:
    """A model as freshness compares and names it: the same file name can stand for another
    file, or for a server's model, so the backend and the identity are said too."""

    backend: str   # BackendKind value
    name: str      # file name, or the server's model id
    model_id: str  # local: the file's SHA-256; servers: the model id

    @classmethod
    def of_backend(cls, backend: Backend) -> ModelIdentity:
        return cls(backend.kind.value, backend.model_name, backend.model_id)

    @classmethod
    def of_record(cls, record: OutputRecord) -> ModelIdentity:
        return cls(record.backend, record.model, record.model_id)

    def describe(self) -> str:
        identity = (f"SHA-256 {self.model_id[:12]}" if self.backend == BackendKind.LOCAL.value
                    else f"model id {self.model_id}")
        return f"the model {self.name} ({self.backend}, {identity})"


@dataclass(frozen=True)
class Verdict:
    """The judgement of one output."""

    key: str
    path: Path
    state: OutputState
    reason: StaleReason | None = None
    newer_inputs: tuple[str, ...] = ()        # OLDER: the inputs changed since it was made
    record: OutputRecord | None = None        # its record, if it has a valid one
    changes: tuple[OptionChange, ...] = ()    # OTHER_RECIPE: what differs
    problem: str = ""                         # NOT_A_FILE: what is there instead

    @property
    def fresh(self) -> bool:
        return self.state is OutputState.FRESH

    def describe(self) -> str:
        """Why it must be made again ('' when fresh): "made with other options (temperature 0.8 → 1.5)"."""
        if self.state is OutputState.MISSING:
            return "missing"
        if self.reason is StaleReason.OTHER_MODEL and self.record is not None:
            return f"made by another model ({self.record.model})"
        if self.reason is StaleReason.OTHER_RECIPE:
            return f"made with other options ({self.changes_described()})"
        if self.reason is StaleReason.NOT_A_FILE:
            return self.problem
        if self.reason is StaleReason.OLDER:
            return "older than " + (" and ".join(self.newer_inputs) if self.newer_inputs else "its inputs")
        return ""

    def changes_described(self) -> str:
        return ", ".join(change.describe() for change in self.changes)


@dataclass(frozen=True)
class SetVerdict:
    verdicts: tuple[Verdict, ...]

    @property
    def stale(self) -> bool:
        """True if any output is missing or stale: the set is made again as a whole."""
        return any(not v.fresh for v in self.verdicts)

    def first(self, reason: StaleReason) -> Verdict | None:
        return next((v for v in self.verdicts if v.reason is reason), None)

    def check_writable(self) -> None:
        """InputFileError if a folder or other non-file is where an output goes."""
        blocked = self.first(StaleReason.NOT_A_FILE)
        if blocked is not None:
            raise InputFileError(blocked.problem)


@dataclass(frozen=True)
class OutputSet:
    """The outputs `keys` of one draft or test prompt (see the module's docstring)."""

    workspace: Workspace
    kind: InputKind
    source: Path                 # the draft or test prompt file
    keys: tuple[str, ...] = ()
    prelude: Path | None = None  # a test prompt's prelude; None for a draft or when it has none
    problem: str = ""            # why a test prompt has no prelude (see all_output_sets)

    @classmethod
    def for_draft(cls, workspace: Workspace, path: Path, keys: Iterable[OutputKey] = ()) -> OutputSet:
        return cls(workspace, InputKind.DRAFT, path, _texts(keys))

    @classmethod
    def for_test_prompt(cls, workspace: Workspace, path: Path, keys: Iterable[OutputKey] = (), *,
                        without_prelude: bool = False) -> OutputSet:
        """Raises InputFileError if the prompt's name names no prelude file; with
        `without_prelude`, the set has `prelude` None instead and `problem` says why."""
        try:
            prelude = workspace.test_prompt(path).prelude_path
        except InputFileError as error:
            if not without_prelude:
                raise
            return cls(workspace, InputKind.TEST_PROMPT, path, _texts(keys), None, str(error))
        return cls(workspace, InputKind.TEST_PROMPT, path, _texts(keys), prelude)

    def with_keys(self, keys: Iterable[OutputKey]) -> OutputSet:
        return dataclasses.replace(self, keys=_texts(keys))

    @property
    def folder(self) -> Path:
        return self.workspace.folder(DRAFTS_OUTPUTS if self.kind is InputKind.DRAFT else TEST_PROMPTS_OUTPUTS)

    def path(self, key: OutputKey) -> Path:
        return self.folder / f"{self.source.stem}{OUTPUT_INFIX}{key}{OUTPUT_SUFFIX}"

    @property
    def outputs(self) -> dict[str, Path]:
        """The path of each key's output, in the order of `keys`."""
        return {key: self.path(key) for key in self.keys}

    def existing(self) -> dict[str, Path]:
        """The outputs of this input found on disk (any K and the deterministic one), in key order."""
        if not self.folder.is_dir():
            return {}
        prefix = f"{self.source.stem}{OUTPUT_INFIX}"
        found = {path.name[len(prefix):-len(OUTPUT_SUFFIX)]: path for path in self.folder.iterdir()
                 if path.name.startswith(prefix) and path.suffix == OUTPUT_SUFFIX
                 and PRELUDE_SEPARATOR not in path.name[len(prefix):]}  # "A.output-1---x.txt" is A's prompt's
        return {key: found[key] for key in sorted(found, key=key_order)}

    def sidecar(self) -> Path | None:
        """The input's schema or grammar sidecar; ConstraintError if it is unusable."""
        return sidecar_of(self.source)

    def own_inputs(self) -> list[Path]:
        """The input and its sidecar; ConstraintError if the sidecar is unusable."""
        sidecar = self.sidecar()
        return [self.source, *([sidecar] if sidecar else [])]

    def inputs(self) -> list[Path]:
        """The files the outputs depend on: the input, its sidecar, a test prompt's prelude.
        Raises ConstraintError if the sidecar is unusable."""
        return [*self.own_inputs(), *([self.prelude] if self.prelude else [])]

    def recipes(self, sampling: SamplingOptions, draft: Draft | None = None) -> dict[str, Recipe]:
        """The recipe of each key's output when made with `sampling` and the draft mode `draft`
        (Backend.draft; the deterministic one, and every one when `sampling` is greedy, is
        decoded greedily)."""
        grammar = Grammar.of_sidecar(self.sidecar())
        return {key: Recipe.of(sampling, greedy=key == DETERMINISTIC or sampling.greedy, grammar=grammar, draft=draft)
                for key in self.keys}

    def judge(self, sampling: SamplingOptions | None = None, model_id: str | None = None,
              draft: Draft | None = None) -> SetVerdict:
        """A verdict per output, made with `sampling` and the draft mode `draft` by the model
        `model_id` (ModelIdentity). `sampling` None: the recipe is not judged; `model_id` None:
        the model is not; `draft` None: the draft mode is not. Raises InputFileError where an
        output could never be written (a folder in its place) and ConstraintError if the
        sidecar is unusable."""
        inputs = self.inputs()
        recipes = self.recipes(sampling, draft) if sampling is not None else {}
        return SetVerdict(tuple(judge_output(key, path, inputs, recipes.get(key), model_id)
                                for key, path in self.outputs.items()))


def judge_output(key: str, path: Path, inputs: Sequence[Path], recipe: Recipe | None,
                 model_id: str | None) -> Verdict:
    """One output's verdict: missing; older than an input (make's rule); made by another
    model; made with another recipe; else fresh."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return Verdict(key, path, OutputState.MISSING)
    if stat.S_ISLNK(info.st_mode):  # writing replaces the link, never what it points to
        return Verdict(key, path, OutputState.STALE, StaleReason.OLDER)
    if not stat.S_ISREG(info.st_mode):
        return Verdict(key, path, OutputState.STALE, StaleReason.NOT_A_FILE,
                       problem=f"{path} is {kind_of(info.st_mode)}, not a file; remove it so that "
                               "the output can be written there")
    record = read_record(path)
    newer = tuple(p.name for p in inputs if _changed_since(p, info.st_mtime_ns))
    if newer:
        return Verdict(key, path, OutputState.STALE, StaleReason.OLDER, newer, record)
    if record is not None and model_id is not None and record.model_id != model_id:
        return Verdict(key, path, OutputState.STALE, StaleReason.OTHER_MODEL, record=record)
    made_with = Recipe.from_json(record.recipe) if record is not None else None
    changes = recipe.changes_since(made_with) if recipe is not None and made_with is not None else []
    if changes:
        return Verdict(key, path, OutputState.STALE, StaleReason.OTHER_RECIPE, record=record, changes=tuple(changes))
    return Verdict(key, path, OutputState.FRESH, record=record)


def _changed_since(path: Path, made_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns > made_ns
    except OSError:  # vanished meanwhile: what the output was made from is gone
        return True


def key_order(key: str) -> tuple[int, int, str]:
    """The deterministic output first, then 0, 1, 2, ... as numbers, then anything else."""
    if key == DETERMINISTIC:
        return (0, 0, "")
    if key.isdigit():
        return (1, int(key), "")
    return (2, 0, key)


def _texts(keys: Iterable[OutputKey]) -> tuple[str, ...]:
    return tuple(str(key) for key in keys)


def all_output_sets(workspace: Workspace, *, draft_keys: Iterable[OutputKey] = (),
                    prompt_keys: Iterable[OutputKey] = ()) -> list[OutputSet]:
    """The output set of every draft, then of every test prompt, sorted by file name. A test
    prompt whose name names no prelude file gets `prelude` None and `problem` saying why."""
    return [*(OutputSet.for_draft(workspace, path, draft_keys) for path in workspace.drafts()),
            *(OutputSet.for_test_prompt(workspace, path, prompt_keys, without_prelude=True)
              for path in workspace.test_prompt_files())]
