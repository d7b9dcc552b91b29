"""The workspace commands as library functions; the CLI only parses and renders.

A per-file problem (bad name, missing prelude, not UTF-8, too long for the context) is
logged and the file skipped while the others are still done; anything else stops the run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from .errors import ContextOverflowError, InputFileError
from .options import SamplingOptions, derive_seed
from .progress import Progress
from .runner import Runner
from .workspace import (DETERMINISTIC, DRAFTS, DRAFTS_OUTPUTS, PRELUDES, TEST_PROMPTS,
                        TEST_PROMPTS_OUTPUTS, Workspace, read_input_text, stale, write_output)

log = logging.getLogger(__name__)
SKIPPABLE = (InputFileError, ContextOverflowError)


@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    up_to_date: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skip(self, path: Path, error: Exception) -> None:
        log.error("skipped %s: %s", path.name, error)
        self.skipped.append((path, str(error)))


def output_keys(n: int, deterministic: bool) -> list[int | str]:
    return [DETERMINISTIC] if deterministic else list(range(n))


def seeds_for(keys: list[int | str], sampling: SamplingOptions) -> list[int | None]:
    """Greedy for the deterministic output, else the seed derived from the base seed and K."""
    if sampling.greedy:
        return [None] * len(keys)
    return [None if key == DETERMINISTIC else derive_seed(sampling.seed, int(key)) for key in keys]


class _PreludeTokens:
    """Tokenizes each prelude file once per run."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._tokens: dict[Path, list[int]] = {}

    def __call__(self, path: Path) -> list[int]:
        if path not in self._tokens:
            self._tokens[path] = self._runner.prelude_tokens(read_input_text(path), f"{PRELUDES}/{path.name}")
        return self._tokens[path]


def precache_preludes(workspace: Workspace, runner: Runner) -> RunReport:
    """Compute and store every prelude's state; shorter ones first, so a prelude that
    extends another is built from the other's state."""
    report = RunReport()
    tokens_of = _PreludeTokens(runner)
    work: list[tuple[Path, list[int]]] = []
    for path in workspace.preludes():
        try:
            work.append((path, tokens_of(path)))
        except SKIPPABLE as error:
            report.skip(path, error)
    work.sort(key=lambda item: (len(item[1]), item[0].name))
    progress = Progress(len(work))
    for path, tokens in work:
        progress.start_item(f"{PRELUDES}/{path.name}", f"{len(tokens)} tokens")
        load = runner.load_prelude(tokens, path.stem, on_prefill=progress.prefill)
        (report.written if load.computed_tokens else report.up_to_date).append(path)
        if load.source == "prefix":
            log.info("    built on a cached prefix of %d tokens", load.reused_tokens)
        progress.finish_item()
    return report


def outputs_for_drafts(workspace: Workspace, runner: Runner, sampling: SamplingOptions,
                       n: int, force: bool) -> RunReport:
    """N sampled answers per draft; a draft is a prelude with an empty prompt."""
    report = RunReport()
    keys = output_keys(n, False)
    todo = []
    for draft in workspace.drafts():
        outputs = [workspace.draft_output(draft, key) for key in keys]
        if force or any(stale(o, [draft]) for o in outputs):
            todo.append((draft, outputs))
        else:
            report.up_to_date.append(draft)
    progress = Progress(len(todo))
    for draft, outputs in todo:
        try:
            tokens = runner.prelude_tokens(read_input_text(draft), f"{DRAFTS}/{draft.name}")
        except SKIPPABLE as error:
            report.skip(draft, error)
            progress.finish_item()
            continue
        _generate(runner, progress, f"{DRAFTS}/{draft.name}", tokens, [], sampling, keys, outputs,
                  label=f"draft {draft.stem}", store=False, report=report)
    return report


def outputs_test_prompts(workspace: Workspace, runner: Runner, sampling: SamplingOptions,
                         n: int, deterministic: bool, force: bool) -> RunReport:
    """Answers per test prompt: N sampled ones, or one greedy with `deterministic`."""
    report = RunReport()
    keys = output_keys(n, deterministic)
    todo = []
    for path in workspace.test_prompt_files():
        try:
            prompt = workspace.test_prompt(path)
        except SKIPPABLE as error:
            report.skip(path, error)
            continue
        outputs = [workspace.prompt_output(path, key) for key in keys]
        if force or any(stale(o, [path, prompt.prelude_path]) for o in outputs):
            todo.append((prompt, outputs))
        else:
            report.up_to_date.append(path)
    todo.sort(key=lambda item: (item[0].prelude_path.name, item[0].path.name))
    tokens_of = _PreludeTokens(runner)
    progress = Progress(len(todo))
    for prelude_path, group in groupby(todo, key=lambda item: item[0].prelude_path):
        ready: list[tuple[Path, list[int], list[Path]]] = []
        for prompt, outputs in group:
            try:
                prelude = tokens_of(prelude_path)
                prompt_tokens = runner.prompt_tokens(read_input_text(prompt.path))
                runner.check_fits(prelude, prompt_tokens)
            except SKIPPABLE as error:
                report.skip(prompt.path, error)
                progress.finish_item()
                continue
            ready.append((prompt.path, prompt_tokens, outputs))
        if deterministic or sampling.greedy or len(ready) < 2:
            for path, prompt_tokens, outputs in ready:
                _generate(runner, progress, f"{TEST_PROMPTS}/{path.name}", tokens_of(prelude_path),
                          prompt_tokens, sampling, keys, outputs, label=prelude_path.stem, store=True,
                          report=report)
        else:
            _generate_together(runner, progress, tokens_of(prelude_path), ready, sampling, keys,
                               label=prelude_path.stem, report=report)
    return report


def _generate_together(runner: Runner, progress: Progress, prelude: list[int],
                       ready: list[tuple[Path, list[int], list[Path]]], sampling: SamplingOptions,
                       keys: list[int | str], *, label: str, report: RunReport) -> None:
    """The sampled outputs of several prompts of one prelude, decoded in one batch: more
    sequences per llama_decode call is faster (README, "Speed"). Their outputs depend on the
    batch, so the stale prompts of a prelude are generated as a set."""
    described = f"{len(ready)} prompts x {len(keys)} outputs"
    progress.start_item(f"{TEST_PROMPTS}/{label}---*", f"{described}, {len(prelude)} + "
                        f"{'/'.join(str(len(p)) for _, p, _ in ready)} tokens")
    budget = len(ready) * len(keys) * sampling.max_tokens
    seeds = seeds_for(keys, sampling)
    try:
        texts = runner.generate_many(prelude, [p for _, p, _ in ready], sampling, [seeds] * len(ready),
                                     label=label, store=True, on_prefill=progress.prefill,
                                     on_step=lambda new: progress.generated(new, described, budget))
    except ContextOverflowError as error:
        log.warning("%s: %s; generating one prompt at a time", label, error)
        for path, prompt_tokens, outputs in ready:
            _generate(runner, progress, f"{TEST_PROMPTS}/{path.name}", prelude, prompt_tokens, sampling,
                      keys, outputs, label=label, store=True, report=report)
        return
    for (_, _, outputs), prompt_texts in zip(ready, texts):
        progress.finish_item()
        for path, text in zip(outputs, prompt_texts):
            write_output(path, text)
            report.written.append(path)


def _generate(runner: Runner, progress: Progress, name: str, prelude: list[int], prompt: list[int],
              sampling: SamplingOptions, keys: list[int | str], outputs: list[Path], *,
              label: str, store: bool, report: RunReport) -> None:
    """All outputs of one input together: outputs decoded side by side depend on each
    other's batch, so they are regenerated as a set to stay reproducible."""
    described = "greedy output" if keys == [DETERMINISTIC] else f"outputs 1-{len(keys)} of {len(keys)}"
    progress.start_item(name, f"{described}, {len(prelude)} + {len(prompt)} tokens")
    budget = len(keys) * sampling.max_tokens
    try:
        texts = runner.generate(prelude, prompt, sampling, seeds_for(keys, sampling), label=label,
                                store=store, on_prefill=progress.prefill,
                                on_step=lambda new: progress.generated(new, described, budget))
    except ContextOverflowError as error:
        report.skip(Path(name), error)
        return
    finally:
        progress.finish_item()
    for path, text in zip(outputs, texts):
        write_output(path, text)
        report.written.append(path)


# ----- token statistics ----------------------------------------------------------------------


@dataclass
class FileTokens:
    name: str
    tokens: int | None  # None: the file could not be read
    problem: str = ""
    prelude: tuple[str, int] | None = None
    outputs: list[tuple[str, int]] = field(default_factory=list)

    @property
    def with_prelude(self) -> int:
        return (self.tokens or 0) + (self.prelude[1] if self.prelude else 0)


@dataclass
class TokenStats:
    context_length: int
    folders: dict[str, list[FileTokens]]


def token_stats(workspace: Workspace, runner: Runner) -> TokenStats:
    """Token counts of every input, of each test prompt with its prelude, and of outputs."""
    prelude_counts: dict[Path, int] = {}

    def count(path: Path, at_start: bool) -> int:
        return runner.count_tokens(read_input_text(path), at_start=at_start)

    folders: dict[str, list[FileTokens]] = {}
    folders[DRAFTS] = [_file_tokens(path, lambda p: count(p, True), workspace, DRAFTS_OUTPUTS, runner)
                       for path in workspace.drafts()]
    folders[PRELUDES] = []
    for path in workspace.preludes():
        item = _file_tokens(path, lambda p: count(p, True), workspace, None, runner)
        if item.tokens is not None:
            prelude_counts[path] = item.tokens
        folders[PRELUDES].append(item)
    folders[TEST_PROMPTS] = []
    for path in workspace.test_prompt_files():
        item = _file_tokens(path, lambda p: count(p, False), workspace, TEST_PROMPTS_OUTPUTS, runner)
        try:
            prelude_path = workspace.test_prompt(path).prelude_path
            if prelude_path in prelude_counts:
                item.prelude = (prelude_path.name, prelude_counts[prelude_path])
        except InputFileError as error:
            item.problem = str(error)
        folders[TEST_PROMPTS].append(item)
    return TokenStats(runner.n_ctx, folders)


def _file_tokens(path: Path, counter, workspace: Workspace, outputs_folder: str | None,
                 runner: Runner) -> FileTokens:
    try:
        item = FileTokens(path.name, counter(path))
    except InputFileError as error:
        return FileTokens(path.name, None, problem=str(error))
    if outputs_folder is not None:
        for output in workspace.existing_outputs(outputs_folder, path):
            try:
                text = read_input_text(output)
            except InputFileError:
                continue
            item.outputs.append((output.name, runner.count_tokens(text, at_start=False)))
    return item
