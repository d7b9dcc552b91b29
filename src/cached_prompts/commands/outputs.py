"""The workspace commands as library functions; the CLI only parses and renders.

They speak only to a `Backend` (backend.py). A per-file problem (bad name, missing prelude,
not UTF-8, too long for the context) is logged and the file skipped while the others are
still done; so is an input during which the llama.cpp worker crashed (WorkerCrashError: a new
worker takes the next input). Anything else stops the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from cached_prompts.backend.interface import (Backend, Completion, FailedOutput, GenerationRequest, OutputConstraint,
                                              PreludeKind, PreludeSource, PromptJob)
from cached_prompts.errors import ContextOverflowError, IncompleteOutputsError, InputFileError, WorkerCrashError
from cached_prompts.options import SamplingOptions, derive_seed
from cached_prompts.commands.progress import Progress
from cached_prompts.commands.run_events import QUIET, ChangeCheck, InputStamp, RunObserver
from cached_prompts.workspace.records import OutputRecord, new_run_id, utc_now, write_records
from cached_prompts.method.constraints import load_constraint
from cached_prompts.workspace.outputs import ModelIdentity, OutputKey, OutputSet, StaleReason
from cached_prompts.workspace.recipe import Recipe
from cached_prompts.workspace.layout import (DETERMINISTIC, DRAFTS, PRELUDES, TEST_PROMPTS, Workspace, printable,
                        remove_stale_output_temp_files, write_output)

log = logging.getLogger(__name__)
SKIPPABLE = (InputFileError, ContextOverflowError, WorkerCrashError)


@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    up_to_date: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)  # in every output's record
    observer: RunObserver = QUIET  # hears what is being made (watch's live page)
    changed: list[Path] = field(default_factory=list)  # inputs that changed while their outputs were made

    def skip(self, path: Path, error: Exception) -> None:
        log.error("%s %s: %s", "failed" if isinstance(error, WorkerCrashError) else "skipped", printable(path.name),
                  error)
        self.skipped.append((path, str(error)))


def output_keys(n: int, deterministic: bool) -> list[OutputKey]:
    return [DETERMINISTIC] if deterministic else list(range(n))


def seeds_for(keys: list[OutputKey], sampling: SamplingOptions) -> list[int | None]:
    """Greedy for the deterministic output, else the seed derived from the base seed and K."""
    if sampling.greedy:
        return [None] * len(keys)
    return [None if key == DETERMINISTIC else derive_seed(sampling.seed, int(key)) for key in keys]


class StaleOutputs:
    """Which output sets a run makes again (OutputSet.judge with this run's model and options),
    warning once per reason that is not the files' age: another model made them, or other
    options did (naming each option that changed)."""

    def __init__(self, backend: Backend, sampling: SamplingOptions) -> None:
        self._model = ModelIdentity.of_backend(backend)
        self._sampling = sampling
        self._draft = backend.draft
        self._said: set[str] = set()

    def stale(self, outputs: OutputSet) -> bool:
        """True if any output of the set is missing or stale; raises InputFileError where one
        cannot be written or the sidecar is unusable."""
        verdict = outputs.judge(self._sampling, self._model.model_id, self._draft)
        verdict.check_writable()
        other_model = verdict.first(StaleReason.OTHER_MODEL)
        if other_model is not None and other_model.record is not None:
            self._say("model", "outputs such as %s were made by %s, this run uses %s: they are made again",
                      other_model.path.name, ModelIdentity.of_record(other_model.record).describe(),
                      self._model.describe())
        other_recipe = verdict.first(StaleReason.OTHER_RECIPE)
        if other_recipe is not None:
            changes = other_recipe.changes_described()
            self._say(changes, "outputs such as %s were made with other options (%s): they are made again",
                      other_recipe.path.name, changes)
        return verdict.stale

    def _say(self, topic: str, message: str, *args: object) -> None:
        if topic not in self._said:
            self._said.add(topic)
            log.warning(message, *args)


class PreludeTexts:
    """Reads and tokenizes each prelude file once per run."""

    def __init__(self, backend: Backend, workspace: Workspace) -> None:
        self._backend = backend
        self._workspace = workspace
        self._read: dict[Path, tuple[str, list[int]]] = {}
        self.stamps: dict[Path, InputStamp] = {}  # of each prelude, taken before it was read

    def __call__(self, path: Path) -> tuple[str, list[int]]:
        """(text, tokens) of a prelude file."""
        if path not in self._read:
            self.stamps[path] = InputStamp.take([path])
            text = self._workspace.read_input(path)
            self._read[path] = (text, self._backend.prelude_tokens(text, f"{PRELUDES}/{path.name}"))
        return self._read[path]


@dataclass
class _Input:
    """One draft or test prompt to answer: its joint tokens and its outputs."""

    output_set: OutputSet
    full: list[int]
    recipes: dict[str, Recipe]  # of each output, for its record
    constraint: OutputConstraint | None = None  # from its schema or grammar sidecar (method/constraints.py)
    seen: InputStamp = InputStamp()  # its inputs before they were read (run_events.InputStamp)

    @property
    def path(self) -> Path:
        return self.output_set.source

    @property
    def outputs(self) -> list[Path]:
        """Where its outputs go, in the order of the keys (and of each job's seeds)."""
        return list(self.output_set.outputs.values())


def precache_preludes(workspace: Workspace, backend: Backend) -> RunReport:
    """Compute and store every prelude's state; shorter ones first, so a prelude that
    extends another is built from the other's state."""
    report = RunReport()
    preludes = PreludeTexts(backend, workspace)
    work: list[tuple[Path, list[int]]] = []
    for path in workspace.preludes():
        try:
            work.append((path, preludes(path)[1]))
        except SKIPPABLE as error:
            report.skip(path, error)
    work.sort(key=lambda item: (len(item[1]), item[0].name))
    progress = Progress(len(work))
    for path, tokens in work:
        progress.start_item(f"{PRELUDES}/{path.name}", f"{len(tokens)} tokens")
        try:
            load = backend.prepare_prelude(tokens, path.stem, on_prefill=progress.prefill)
        except WorkerCrashError as error:
            progress.finish_item()
            report.skip(path, error)
            continue
        (report.written if load.computed_tokens else report.up_to_date).append(path)
        if load.source == PreludeSource.PREFIX:
            log.info("    built on a cached prefix of %d tokens", load.reused_tokens)
        progress.finish_item()
    return report


def outputs_for_drafts(workspace: Workspace, backend: Backend, sampling: SamplingOptions,
                       n: int, force: bool, *, observer: RunObserver = QUIET) -> RunReport:
    """N sampled answers per draft; a draft is a prelude with an empty prompt."""
    report = RunReport(observer=observer)
    remove_stale_output_temp_files(workspace)
    keys = output_keys(n, False)
    judge = StaleOutputs(backend, sampling)
    todo = []
    for draft in workspace.drafts():
        outputs = OutputSet.for_draft(workspace, draft, keys)
        try:
            is_stale = judge.stale(outputs) or force  # checks that the outputs can be written too
        except SKIPPABLE as error:
            report.skip(draft, error)
            continue
        if is_stale:
            todo.append(outputs)
        else:
            report.up_to_date.append(draft)
    progress = Progress(len(todo))
    for outputs in todo:
        draft = outputs.source
        try:
            seen = InputStamp.take(outputs.inputs())
            tokens = backend.prelude_tokens(workspace.read_input(draft), f"{DRAFTS}/{draft.name}")
            item = _Input(outputs, tokens, outputs.recipes(sampling, backend.draft), load_constraint(draft, backend),
                          seen)
        except SKIPPABLE as error:
            report.skip(draft, error)
            progress.finish_item()
            continue
        _generate(backend, progress, f"{DRAFTS}/{draft.name}", tokens, [item],
                  sampling, keys, label=f"draft {draft.stem}", kind=PreludeKind.DRAFT, report=report)
    return report


def outputs_test_prompts(workspace: Workspace, backend: Backend, sampling: SamplingOptions,
                         n: int, deterministic: bool, force: bool, *, observer: RunObserver = QUIET) -> RunReport:
    """Answers per test prompt: N sampled ones, or one greedy with `deterministic`."""
    report = RunReport(observer=observer)
    remove_stale_output_temp_files(workspace)
    keys = output_keys(n, deterministic)
    judge = StaleOutputs(backend, sampling)
    todo: list[OutputSet] = []
    for path in workspace.test_prompt_files():
        try:
            outputs = OutputSet.for_test_prompt(workspace, path, keys)
            is_stale = judge.stale(outputs) or force
        except SKIPPABLE as error:
            report.skip(path, error)
            continue
        if is_stale:
            todo.append(outputs)
        else:
            report.up_to_date.append(path)
    todo.sort(key=lambda outputs: (outputs.prelude.name, outputs.source.name))
    preludes = PreludeTexts(backend, workspace)
    progress = Progress(len(todo))
    for prelude_path, group in groupby(todo, key=lambda outputs: outputs.prelude):
        ready: list[_Input] = []
        for outputs in group:
            try:
                prelude_text, prelude = preludes(prelude_path)
                seen = preludes.stamps[prelude_path] + InputStamp.take(outputs.own_inputs())
                full = backend.joint_tokens(prelude_text, workspace.read_input(outputs.source))
                backend.check_fits(prelude, full)
                ready.append(_Input(outputs, full, outputs.recipes(sampling, backend.draft),
                                    load_constraint(outputs.source, backend), seen))
            except SKIPPABLE as error:
                report.skip(outputs.source, error)
                progress.finish_item()
        if not ready:
            continue
        prelude = preludes(prelude_path)[1]
        # Sampled outputs of several prompts are decoded together (faster: README, "Speed");
        # greedy ones are decoded alone anyway.
        together = not (deterministic or sampling.greedy) and len(ready) > 1
        for batch in ([ready] if together else [[item] for item in ready]):
            name = (f"{TEST_PROMPTS}/{prelude_path.stem}---*" if len(batch) > 1
                    else f"{TEST_PROMPTS}/{batch[0].path.name}")
            _generate(backend, progress, name, prelude, batch, sampling, keys, label=prelude_path.stem,
                      kind=PreludeKind.PRELUDE, report=report)
    return report


def _generate(backend: Backend, progress: Progress, name: str, prelude: list[int], batch: list[_Input],
              sampling: SamplingOptions, keys: list[OutputKey], *, label: str, kind: PreludeKind,
              report: RunReport) -> None:
    """All outputs of the inputs in `batch` together: outputs decoded side by side depend on
    each other's batch, so they are regenerated as a set to stay reproducible. If they do not
    fit the context together, each input is tried alone."""
    described = _describe(len(batch), keys)
    sizes = "/".join(str(len(item.full) - len(prelude)) for item in batch)
    progress.start_item(name, f"{described}, {len(prelude)} + {sizes} tokens")
    budget = len(batch) * len(keys) * sampling.max_tokens
    request = GenerationRequest(prelude, [PromptJob.constrained(item.full, seeds_for(keys, sampling), item.constraint)
                                          for item in batch],
                                sampling, label, kind=kind, store=kind != PreludeKind.DRAFT)
    started = time.monotonic()
    observer = report.observer
    making = [path for item in batch for path in item.outputs]
    observer.generating(making, f"{name}: {described}", budget)
    check = ChangeCheck([item.seen for item in batch]) if observer.abandon_when_inputs_change else None
    counters = backend.counters
    drafts_before = (counters.drafted_tokens, counters.accepted_tokens)

    def step(new: int) -> None:
        progress.generated(new, described, budget, drafted=counters.drafted_tokens - drafts_before[0],
                           accepted=counters.accepted_tokens - drafts_before[1])
        observer.step(new)
        if check is not None:
            check()

    try:
        results = backend.generate_results(request, on_prefill=progress.prefill, on_step=step,
                                           on_text=lambda job, k, piece: observer.text(batch[job].outputs[k], piece))
    except WorkerCrashError as error:  # the inputs in flight failed; a new worker takes the next ones
        for item in batch:
            progress.finish_item()
            report.skip(item.path, error)
            observer.not_written(item.outputs, str(error))
        return
    except BaseException as error:
        observer.not_written(making, str(error) or type(error).__name__)
        if not isinstance(error, ContextOverflowError):
            raise
        if len(batch) == 1:
            progress.finish_item()
            report.skip(batch[0].path, error)
            return
        log.warning("%s: %s; generating one prompt at a time", label, error)
        for item in batch:
            _generate(backend, progress, f"{TEST_PROMPTS}/{item.path.name}", prelude, [item], sampling, keys,
                      label=label, kind=kind, report=report)
        return
    seconds = time.monotonic() - started
    for item, item_results in zip(batch, results):
        progress.finish_item()
        failed = [result for result in item_results if isinstance(result, FailedOutput)]
        if failed:  # servers that failed: the input's outputs are made again on the next run
            lost = IncompleteOutputsError(f"no server could make {len(failed)} of its {len(item_results)} "
                                          f"outputs ({failed[0].reason})")
            report.skip(item.path, lost)
            observer.not_written(item.outputs, str(lost))
            continue
        made = _Made(backend, sampling, report.run_id, seconds, len(prelude), len(item.full) - len(prelude))
        _write_outputs(item, [result for result in item_results if isinstance(result, Completion)], made, report)


def _describe(n_inputs: int, keys: list[OutputKey]) -> str:
    if keys == [DETERMINISTIC]:
        return "greedy output" if n_inputs == 1 else f"{n_inputs} greedy outputs"
    if n_inputs == 1:
        return f"outputs 1-{len(keys)} of {len(keys)}"
    return f"{n_inputs} prompts x {len(keys)} outputs"


@dataclass
class _Made:
    """What made a set of outputs, for their records (workspace/records.py)."""

    backend: Backend
    sampling: SamplingOptions
    run_id: str
    seconds: float
    prelude_tokens: int
    prompt_tokens: int

    def record(self, completion: Completion, recipe: Recipe) -> OutputRecord:
        sampling = self.sampling if completion.seed is not None else self.sampling.as_greedy()
        return OutputRecord(model=self.backend.model_name, model_id=self.backend.model_id,
                            backend=self.backend.kind.value, sampling=sampling.model_dump(),
                            seed=completion.seed, created=utc_now(), run_id=self.run_id,
                            generated_tokens=completion.tokens, seconds=round(self.seconds, 3),
                            prelude_tokens=self.prelude_tokens, prompt_tokens=self.prompt_tokens,
                            n_ctx=self.backend.n_ctx, stop_reason=completion.stop_reason,
                            recipe=recipe.to_json(), drafted_tokens=completion.drafted_tokens,
                            accepted_tokens=completion.accepted_tokens)


def _write_outputs(item: _Input, completions: list[Completion], made: _Made, report: RunReport) -> None:
    if item.seen.changed():
        # Answers to the text as it was: written now, they would look newer than the input
        # and so fresh. The next run (or watch's next round) makes them from the new text.
        log.warning("%s changed while its outputs were made: they are not written; run again to make them",
                    item.path.name)
        report.changed.append(item.path)
        report.observer.not_written(item.outputs, f"{item.path.name} changed meanwhile")
        return
    for path, completion in zip(item.outputs, completions):
        write_output(path, completion.text)
        report.written.append(path)
    write_records((path, made.record(c, item.recipes[key]))
                  for (key, path), c in zip(item.output_set.outputs.items(), completions))
    report.observer.written(item.outputs)
