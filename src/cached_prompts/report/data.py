"""What the HTML report shows, read from the workspace: every draft and test prompt with its
outputs, their freshness, token counts, records, and the inputs a run would skip and why.

Nothing here writes or renders; `report.py` turns a ReportData into HTML.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cached_prompts.commands.check import InputCheck, OutputCheck, check_workspace
from cached_prompts.errors import InputFileError
from cached_prompts.method.checking import Rate
from cached_prompts.fs.regular import NotRegularFileError, read_regular
from cached_prompts.method.scoring import ShownAnswer, read_scores
from cached_prompts.options import Draft, SamplingOptions
from cached_prompts.workspace.layout import (DETERMINISTIC, DRAFTS, DRAFTS_OUTPUTS, PRELUDES, TEST_PROMPTS,
                                             TEST_PROMPTS_OUTPUTS, Workspace)
from cached_prompts.workspace.outputs import InputKind, OutputSet, OutputState, Verdict, judge_output, key_order
from cached_prompts.workspace.records import OutputRecord, utc_now

# Largest file shown (4 MiB: a 128k-token prelude takes about 0.5 MiB).
MAX_SHOWN_BYTES = 4 << 20
_OUTPUT_NAME = re.compile(r"(?P<stem>.+)\.output-(?P<key>[^.]+)\.txt")

TokenCounter = Callable[[str, bool], "int | None"]  # None: not known (the live page, before counting)


@dataclass
class FileText:
    """An input or output file as shown: its text (None if unreadable) and token count."""

    name: str  # path from the workspace root, e.g. "preludes/A.txt"
    text: str | None
    problem: str = ""   # why the text is missing, after the file's name: "is not UTF-8 ..."
    tokens: int | None = None


@dataclass
class OutputView:
    name: str  # file name, e.g. "A---x.output-2.txt"
    key: str   # "deterministic", "0", "1", ...
    state: OutputState
    file: FileText | None = None  # None when missing
    record: OutputRecord | None = None
    why_stale: str = ""
    checked: OutputCheck | None = None  # against its input's expectations (check.py); None: it has none

    @property
    def deterministic(self) -> bool:
        return self.key == DETERMINISTIC

    @property
    def tokens(self) -> int | None:
        if self.record is not None:
            return self.record.generated_tokens
        return self.file.tokens if self.file else None


@dataclass
class InputView:
    """A draft or a test prompt with its outputs; `skipped` says why a run would skip it."""

    kind: InputKind
    file: FileText
    outputs: list[OutputView] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    prelude_tokens: int | None = None  # of its prelude; for a draft: the draft itself
    prompt_tokens: int | None = None   # 0 for a draft
    checked: InputCheck | None = None  # its pass rate (check.py); None: no expectations
    check_problem: str = ""  # why its expectations cannot be used

    @property
    def name(self) -> str:
        return Path(self.file.name).stem


@dataclass
class PreludeView:
    file: FileText
    prompts: list[InputView] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    scores: list[ShownAnswer] | None = None  # of its example answers, from score-preludes
    rate: Rate | None = None  # pooled over its test prompts' checked outputs

    @property
    def name(self) -> str:
        return Path(self.file.name).stem


@dataclass
class ReportData:
    workspace_name: str
    made: str
    run_id: str | None
    n_ctx: int | None
    drafts: list[InputView]
    preludes: list[PreludeView]
    orphan_prompts: list[InputView]  # test prompts without a usable prelude name or file
    skipped: list[tuple[str, str]]   # (file from the root, reason), every input a run skips
    stray_outputs: list[str]         # outputs whose input is gone

    def inputs(self) -> list[InputView]:
        return [*self.drafts, *(p for prelude in self.preludes for p in prelude.prompts), *self.orphan_prompts]

    def outputs(self) -> list[OutputView]:
        return [o for item in self.inputs() for o in item.outputs]

    def count(self, state: OutputState) -> int:
        return sum(1 for o in self.outputs() if o.state is state)

    def latest_run(self) -> str | None:
        """The run that made the newest recorded output."""
        records = [o.record for o in self.outputs() if o.record is not None]
        return max(records, key=lambda r: r.created).run_id if records else None

    @cached_property
    def models(self) -> list[str]:
        """The models named by the outputs' records (read once: the outputs are collected)."""
        return sorted({o.record.model for o in self.outputs() if o.record is not None})


# ----- reading files -----------------------------------------------------------------------


def read_shown(path: Path, name: str, *, follow_symlinks: bool) -> FileText:
    """A file's text for display: bounded, regular files only, UTF-8 checked. Inputs are read
    through a link as the commands read them; outputs, which the tool writes, never are."""
    try:
        data, _ = read_regular(path.resolve() if follow_symlinks else path, MAX_SHOWN_BYTES)
    except NotRegularFileError as error:  # "is a FIFO, not a regular file", "is larger than ..."
        return FileText(name, None, str(error.strerror))
    except OSError as error:
        return FileText(name, None, f"cannot be read ({error.strerror or error})")
    try:
        return FileText(name, data.decode("utf-8"))
    except UnicodeDecodeError as error:
        return FileText(name, None, f"is not UTF-8 text (bad byte at offset {error.start}); "
                                    "save it as UTF-8 and run again")


def _count(file: FileText, count_tokens: TokenCounter | None, at_start: bool) -> None:
    if count_tokens is not None and file.text is not None:
        file.tokens = count_tokens(file.text, at_start)


def _by_name(path: Path) -> str:
    return path.stem


# ----- collecting ----------------------------------------------------------------------------


class _Collector:
    def __init__(self, workspace: Workspace, count_tokens: TokenCounter | None, n_ctx: int | None,
                 model_id: str | None, sampling: SamplingOptions | None, draft: Draft | None) -> None:
        self.workspace = workspace
        self.count_tokens = count_tokens
        self.n_ctx = n_ctx
        self.model_id = model_id
        self.sampling = sampling
        self.draft = draft

    def input_file(self, folder: str, path: Path, at_start: bool) -> FileText:
        try:
            self.workspace.check_link(path)
        except InputFileError as error:  # a link out of the workspace: named, never embedded
            return FileText(f"{folder}/{path.name}", None, str(error))
        file = read_shown(path, f"{folder}/{path.name}", follow_symlinks=True)
        _count(file, self.count_tokens, at_start)
        return file

    def outputs(self, item: InputView, outputs: OutputSet, expected: Iterable[str]) -> None:
        """The outputs found, and those a run would make (`expected`) unless it skips the input;
        each judged as the commands judge it (OutputSet.judge), with the reason."""
        found = outputs.existing()
        sidecar_ok = _check_sidecar(item, outputs)  # before the keys: a skipped input makes none
        outputs = outputs.with_keys(sorted(set(found) | (set(expected) if not item.skipped else set()),
                                           key=key_order))
        verdicts = self.judged(outputs, sidecar_ok)
        for key, path in outputs.outputs.items():
            if key not in found:
                item.outputs.append(OutputView(path.name, key, OutputState.MISSING))
                continue
            file = read_shown(path, f"{outputs.folder.name}/{path.name}", follow_symlinks=False)
            _count(file, self.count_tokens, False)
            verdict = verdicts[key]
            item.outputs.append(OutputView(path.name, key, verdict.state, file, verdict.record,
                                           "" if verdict.fresh else verdict.describe()))
        _fill_counts_from_records(item)

    def judged(self, outputs: OutputSet, sidecar_ok: bool) -> dict[str, Verdict]:
        """The verdict per key. With an unusable sidecar the input is skipped, and its outputs
        are judged by its other inputs."""
        if sidecar_ok:
            verdicts = outputs.judge(self.sampling, self.model_id, self.draft).verdicts
        else:
            inputs = [outputs.source, *([outputs.prelude] if outputs.prelude else [])]
            verdicts = tuple(judge_output(key, path, inputs, None, self.model_id)
                             for key, path in outputs.outputs.items())
        return {v.key: v for v in verdicts}

    def prompt_after_prelude(self, prompt: FileText, prelude: FileText) -> int | None:
        """The prompt's tokens as the model sees them after its prelude: the joint text's
        tokens minus the prelude's (a prompt may merge with the prelude's last word)."""
        if (self.count_tokens is None or prelude.tokens is None or prompt.tokens is None
                or prelude.text is None or prompt.text is None):
            return prompt.tokens
        joint = self.count_tokens(prelude.text + prompt.text, True)
        return prompt.tokens if joint is None else joint - prelude.tokens

    def too_long(self, file: FileText, *extra: int | None) -> str:
        """Why `file` (plus `extra` tokens) does not fit the context, or ''."""
        if self.n_ctx is None or file.tokens is None or any(e is None for e in extra):
            return ""
        total = file.tokens + sum(e or 0 for e in extra)
        if total < self.n_ctx:
            return ""
        if not extra:
            return (f"{file.name} has {total} tokens, the context only {self.n_ctx}; "
                    "shorten it or use a longer context")
        return (f"prelude + prompt take {extra[0]} + {file.tokens} = {total} tokens, the context only "
                f"{self.n_ctx}; shorten them or use a longer context")


def _fill_counts_from_records(item: InputView) -> None:
    """Without a token counter, the counts a record kept are the next best thing."""
    for output in item.outputs:
        if output.record is None:
            continue
        if item.prelude_tokens is None:
            item.prelude_tokens = output.record.prelude_tokens
        if item.prompt_tokens is None:
            item.prompt_tokens = output.record.prompt_tokens


def _problems_of_prelude_text(file: FileText) -> list[str]:
    if file.text is None:
        return [f"{file.name} {file.problem}"]
    if file.text == "":
        return [f"{file.name} is empty; write the prelude's text into it"]
    return []


def _expected_keys(output_sets: list[OutputSet]) -> list[str]:
    """The outputs a run like the last ones would make for every input of a folder: output
    0..N-1 for the largest N any input has, and the deterministic one if any input has it;
    output 0 at least, so an input that has none is marked as missing it."""
    keys = {key for outputs in output_sets for key in outputs.existing()}
    numbers = [int(k) for k in keys if k.isdigit()]
    expected = [str(k) for k in range(max(numbers) + 1)] if numbers else ["0"]
    return expected + ([DETERMINISTIC] if DETERMINISTIC in keys else [])


def collect(workspace: Workspace, *, count_tokens: TokenCounter | None, n_ctx: int | None,
            model_id: str | None = None, sampling: SamplingOptions | None = None, run_id: str | None = None,
            skipped: Iterable[tuple[Path, str]] = (), draft: Draft | None = None) -> ReportData:
    """What the page shows. Outputs are judged as a run with `sampling` and the draft mode
    `draft` by the model `model_id` would judge them (any None: not judged by it)."""
    collector = _Collector(workspace, count_tokens, n_ctx, model_id, sampling, draft)
    drafts = _collect_drafts(collector)
    preludes, orphans = _collect_prompts(collector)
    data = ReportData(workspace.root.name, utc_now(), run_id, n_ctx, drafts, preludes, orphans, [],
                      _stray_outputs(workspace, drafts, [*(p for pr in preludes for p in pr.prompts), *orphans]))
    _merge_skipped(data, workspace, skipped)
    _attach_checks(data, workspace, model_id, sampling, draft)
    return data


def _attach_checks(data: ReportData, workspace: Workspace, model_id: str | None,
                   sampling: SamplingOptions | None, draft: Draft | None) -> None:
    """Pass/fail of each output and the rates, as `check` reports them; an expectations file
    `check` cannot use is said on its input (a run still makes its outputs)."""
    report = check_workspace(workspace, model_id=model_id, sampling=sampling, draft=draft)
    by_input = {item.input: item for item in (*report.prompts, *report.drafts)}
    problems = dict(report.skipped)
    for view in data.inputs():
        view.check_problem = problems.get(view.file.name, "")
        checked = by_input.get(view.file.name)
        if checked is None:
            continue
        view.checked = checked
        outputs = {Path(o.output).name: o for o in checked.outputs}
        for output in view.outputs:
            output.checked = outputs.get(output.name)
    rates = dict(report.preludes())
    for prelude in data.preludes:
        prelude.rate = rates.get(prelude.file.name)


def _collect_drafts(collector: _Collector) -> list[InputView]:
    workspace = collector.workspace
    sets = [OutputSet.for_draft(workspace, path) for path in sorted(workspace.drafts(), key=_by_name)]
    expected = _expected_keys(sets)
    drafts = []
    for outputs in sets:
        path = outputs.source
        file = collector.input_file(DRAFTS, path, at_start=True)
        item = InputView(InputKind.DRAFT, file, skipped=_problems_of_prelude_text(file),
                         prelude_tokens=file.tokens, prompt_tokens=0)
        if not item.skipped and (reason := collector.too_long(file)):
            item.skipped.append(reason)
        collector.outputs(item, outputs, expected)
        drafts.append(item)
    return drafts


def _collect_prompts(collector: _Collector) -> tuple[list[PreludeView], list[InputView]]:
    workspace = collector.workspace
    preludes: dict[Path, PreludeView] = {}
    for path in sorted(workspace.preludes(), key=_by_name):  # "a" before "a-long" (by file name: after)
        view = PreludeView(collector.input_file(PRELUDES, path, at_start=True))
        view.skipped = _problems_of_prelude_text(view.file) or [r for r in [collector.too_long(view.file)] if r]
        if view.file.text is not None:
            view.scores = read_scores(workspace, path.name, view.file.text, collector.model_id)
        preludes[path] = view
    sets = [OutputSet.for_test_prompt(workspace, path, without_prelude=True)
            for path in sorted(workspace.test_prompt_files(), key=_by_name)]
    expected = _expected_keys(sets)
    orphans: list[InputView] = []
    for outputs in sets:
        item = InputView(InputKind.TEST_PROMPT, collector.input_file(TEST_PROMPTS, outputs.source, at_start=False))
        if outputs.problem:
            item.skipped.append(outputs.problem)
        prelude = preludes.get(outputs.prelude) if outputs.prelude else None
        _check_prompt(collector, item, prelude)
        collector.outputs(item, outputs, expected)
        (prelude.prompts if prelude else orphans).append(item)
    return list(preludes.values()), orphans


def _check_sidecar(item: InputView, outputs: OutputSet) -> bool:
    """False if the input's schema or grammar sidecar is unusable: the input is then skipped."""
    try:
        outputs.sidecar()
    except InputFileError as error:
        item.skipped.append(str(error))
        return False
    return True


def _check_prompt(collector: _Collector, item: InputView, prelude: PreludeView | None) -> None:
    if item.file.text is None:
        item.skipped.append(f"{item.file.name} {item.file.problem}")
    if prelude is None:
        item.prompt_tokens = item.file.tokens
        return
    item.prelude_tokens = prelude.file.tokens
    item.prompt_tokens = item.file.tokens = collector.prompt_after_prelude(item.file, prelude.file)
    if prelude.skipped:
        item.skipped.append(f"its prelude {prelude.file.name} cannot be used (see above)")
    elif not item.skipped and (reason := collector.too_long(item.file, prelude.file.tokens)):
        item.skipped.append(reason)


def _stray_outputs(workspace: Workspace, drafts: list[InputView], prompts: list[InputView]) -> list[str]:
    stray = []
    for folder, items in ((DRAFTS_OUTPUTS, drafts), (TEST_PROMPTS_OUTPUTS, prompts)):
        claimed = {o.name for item in items for o in item.outputs}
        for path in workspace.inputs(folder):
            if _OUTPUT_NAME.fullmatch(path.name) and path.name not in claimed:
                stray.append(f"{folder}/{path.name}")
    return stray


def _relative_name(workspace: Workspace, path: Path) -> str:
    try:
        return path.relative_to(workspace.root).as_posix() if path.is_absolute() else path.as_posix()
    except ValueError:
        return str(path)


def _merge_skipped(data: ReportData, workspace: Workspace, run_skipped: Iterable[tuple[Path, str]]) -> None:
    """One list of every skipped input: what the workspace shows, plus what the run reported
    (for an input the report shows, the run's reasons replace the report's own guesses)."""
    by_name: dict[str, list[str]] = {}
    for prelude in data.preludes:
        by_name[prelude.file.name] = prelude.skipped
    for item in data.inputs():
        by_name[item.file.name] = item.skipped
    extra: list[tuple[str, str]] = []
    from_run: dict[str, list[str]] = {}
    for path, reason in run_skipped:
        from_run.setdefault(_relative_name(workspace, path), []).append(reason)
    for name, reasons in from_run.items():
        if name in by_name:
            by_name[name][:] = reasons  # what the run met replaces what the report guesses
        else:
            extra.extend((name, reason) for reason in reasons)
    data.skipped = [(name, reason) for name, reasons in by_name.items() for reason in reasons] + extra
    data.skipped.sort()

