"""`check`: the existing outputs of every test prompt and draft against their expectations
(expectations.py, docs/expectations.md). Nothing is generated.

Per input: k of n outputs passed, the rate and its 95% Wilson interval, the threshold it
needs, and each output with the checks it fails. Stale and missing outputs are said, and
count as not passed (the rate is about outputs of the inputs as they are now). Per prelude:
the same over all outputs of its test prompts. An input whose expectations cannot be read is
skipped with one line naming the file and the key. `ok` is False when any input is under its
threshold or was skipped: the CLI's exit status 1, for a CI job.

Library face: `check_workspace(workspace)` returns a CheckReport; `to_json` and `render_text`
turn it into what `check --json` and `check` print.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cached_prompts.backend.interface import Backend
from cached_prompts.errors import InputFileError
from cached_prompts.fs.regular import read_regular
from cached_prompts.method.checking import Answer, Failure, Rate, failures
from cached_prompts.method.expectations import Expectations, for_draft, for_test_prompt
from cached_prompts.options import Draft, SamplingOptions
from cached_prompts.workspace.layout import DETERMINISTIC, MAX_INPUT_BYTES, PRELUDES, Workspace
from cached_prompts.workspace.outputs import InputKind, OutputSet, OutputState, Verdict, all_output_sets, key_order

log = logging.getLogger(__name__)


class OutputStatus(str, enum.Enum):
    FRESH = "fresh"
    STALE = "stale"
    MISSING = "missing"


@dataclass
class OutputCheck:
    output: str  # from the workspace root
    key: str
    status: OutputStatus
    failed: list[Failure] = field(default_factory=list)
    why: str = ""  # why it is stale, or unreadable

    @property
    def passed(self) -> bool:
        return self.status is OutputStatus.FRESH and not self.failed and not self.why


@dataclass
class InputCheck:
    input: str  # from the workspace root
    expectations: Expectations
    outputs: list[OutputCheck] = field(default_factory=list)
    prelude: str | None = None  # a test prompt's prelude, preludes/P.txt

    @property
    def rate(self) -> Rate:
        return Rate(sum(o.passed for o in self.outputs), len(self.outputs))

    @property
    def reaches_threshold(self) -> bool:
        return self.rate.reaches(self.expectations.threshold)


@dataclass
class CheckReport:
    prompts: list[InputCheck] = field(default_factory=list)
    drafts: list[InputCheck] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, why)
    unchecked: list[str] = field(default_factory=list)  # inputs without expectations

    def preludes(self) -> list[tuple[str, Rate]]:
        """Each prelude with the pooled rate of its test prompts' outputs, by name."""
        pooled: dict[str, list[int]] = {}
        for prompt in self.prompts:
            if prompt.prelude is not None:
                counts = pooled.setdefault(prompt.prelude, [0, 0])
                counts[0] += prompt.rate.passed
                counts[1] += prompt.rate.total
        return [(name, Rate(*pooled[name])) for name in sorted(pooled)]

    @property
    def failing(self) -> list[InputCheck]:
        return [item for item in (*self.prompts, *self.drafts) if not item.reaches_threshold]

    @property
    def ok(self) -> bool:
        return not self.failing and not self.skipped


def check_with_backend(workspace: Workspace, backend: Backend, sampling: SamplingOptions | None) -> CheckReport:
    """check_workspace with outputs judged as a run with `sampling` on `backend` (its model and
    draft mode) would judge them: the one rule `check`, `--check` and watch rounds share."""
    return check_workspace(workspace, model_id=backend.model_id, sampling=sampling, draft=backend.draft)


def check_workspace(workspace: Workspace, *, model_id: str | None = None, sampling: SamplingOptions | None = None,
                    draft: Draft | None = None) -> CheckReport:
    """Check every output against its input's expectations. Outputs are judged as a run with
    `sampling` and the draft mode `draft` by the model `model_id` would judge them
    (workspace/outputs.py; any None: not judged by it): the stale ones are not counted as passes."""
    report = CheckReport()
    sets = all_output_sets(workspace)
    expected = {kind: _expected_keys([s for s in sets if s.kind is kind]) for kind in InputKind}
    for outputs in sets:
        shown = f"{outputs.source.parent.name}/{outputs.source.name}"
        if outputs.kind is InputKind.TEST_PROMPT and outputs.prelude is None:
            report.skipped.append((shown, outputs.problem))
            log.error("skipped %s: %s", shown, outputs.problem)
            continue
        item = _input(report, shown, lambda: _expectations(workspace, outputs))
        if item is None:
            continue
        if outputs.prelude is not None:
            item.prelude = f"{PRELUDES}/{outputs.prelude.name}"
        keys = sorted(set(outputs.existing()) | set(expected[outputs.kind]), key=key_order)
        try:
            verdicts = outputs.with_keys(keys).judge(sampling, model_id, draft).verdicts
        except InputFileError as error:  # a bad schema sidecar, a folder where an output goes
            report.skipped.append((shown, str(error)))
            log.error("skipped %s: %s", shown, error)
            continue
        item.outputs = [_check_output(verdict, item.expectations) for verdict in verdicts]
        (report.drafts if outputs.kind is InputKind.DRAFT else report.prompts).append(item)
    return report


def _expectations(workspace: Workspace, outputs: OutputSet) -> Expectations | None:
    if outputs.kind is InputKind.DRAFT:
        return for_draft(workspace, outputs.source)
    return for_test_prompt(workspace, outputs.source, outputs.prelude.stem)  # type: ignore[union-attr]


def _input(report: CheckReport, shown: str, load: Callable[[], Expectations | None]) -> InputCheck | None:
    try:
        expectations = load()
    except InputFileError as error:
        report.skipped.append((shown, str(error)))
        log.error("skipped %s: %s", shown, error)
        return None
    if expectations is None:
        report.unchecked.append(shown)
        return None
    return InputCheck(shown, expectations)


def _check_output(verdict: Verdict, expectations: Expectations) -> OutputCheck:
    shown = f"{verdict.path.parent.name}/{verdict.path.name}"
    if verdict.state is OutputState.MISSING:
        return OutputCheck(shown, verdict.key, OutputStatus.MISSING, why="missing")
    try:
        data, _ = read_regular(verdict.path, MAX_INPUT_BYTES)  # never through a link
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return OutputCheck(shown, verdict.key, OutputStatus.STALE, why=f"cannot be read ({error})")
    record = verdict.record
    answer = Answer(text, record.generated_tokens if record else None, record.stop_reason if record else None)
    status = OutputStatus.FRESH if verdict.fresh else OutputStatus.STALE
    return OutputCheck(shown, verdict.key, status, failures(expectations, answer), verdict.describe())


def _expected_keys(output_sets: list[OutputSet]) -> list[str]:
    """Outputs 0..N-1 for the largest N any input of the folder has, and the deterministic
    one if any has it: what a run like the last ones would make (as the report shows them)."""
    keys = {key for outputs in output_sets for key in outputs.existing()}
    numbers = [int(k) for k in keys if k.isdigit()]
    sampled = [str(k) for k in range(max(numbers) + 1)] if numbers else []
    return sampled + ([DETERMINISTIC] if DETERMINISTIC in keys else [])


# ----- rendering ---------------------------------------------------------------------------------


def _rate_json(rate: Rate) -> dict[str, object]:
    return {"passed": rate.passed, "total": rate.total, "rate": rate.rate, "interval": list(rate.interval)}


def _input_json(item: InputCheck) -> dict[str, object]:
    return {"input": item.input, **_rate_json(item.rate), "threshold": item.expectations.threshold,
            "reaches_threshold": item.reaches_threshold, "expectations": list(item.expectations.files),
            "outputs": [{"output": o.output, "passed": o.passed, "failed": [f.name for f in o.failed],
                         "status": o.status.value, **({"why": o.why} if o.why else {})} for o in item.outputs]}


def to_json(report: CheckReport) -> dict[str, object]:
    return {"prompts": [_input_json(item) for item in report.prompts],
            "preludes": [{"prelude": name, **_rate_json(rate)} for name, rate in report.preludes()],
            "drafts": [_input_json(item) for item in report.drafts],
            "skipped": [{"input": name, "why": why} for name, why in report.skipped],
            "unchecked": report.unchecked, "ok": report.ok}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _row(rate: Rate, name: str, threshold: float | None = None, reaches: bool = True) -> str:
    low, high = rate.interval
    needs = _percent(threshold) if threshold is not None else ""
    verdict = "" if threshold is None else ("ok" if reaches else "UNDER")
    return (f"  {f'{rate.passed}/{rate.total}':>7}  {_percent(rate.rate):>5}  "
            f"{f'[{_percent(low)}, {_percent(high)}]':>12}  {needs:>5}  {verdict:<5}  {name}")


def _output_lines(item: InputCheck) -> list[str]:
    lines = []
    for output in item.outputs:
        if output.passed:
            continue
        name = Path(output.output).name
        said = [f"{f.name} ({f.why})" for f in output.failed]
        if output.why:
            said.insert(0, output.status.value if output.why == output.status.value
                        else f"{output.status.value}: {output.why}")
        lines.append(f"{'':>48}{name}: {'; '.join(said)}")
    return lines


def render_text(report: CheckReport) -> str:
    header = f"  {'passed':>7}  {'rate':>5}  {'95% interval':>12}  {'needs':>5}  {'':<5}  input"
    lines = []
    for title, items in (("test prompts", report.prompts), ("drafts", report.drafts)):
        if not items:
            continue
        lines += [f"{title}:", header]
        for item in items:
            lines.append(_row(item.rate, item.input, item.expectations.threshold, item.reaches_threshold))
            lines += _output_lines(item)
    if report.prompts:
        lines += ["preludes (all outputs of their test prompts):"]
        lines += [_row(rate, name) for name, rate in report.preludes()]
    if not lines:
        lines.append("no test prompt or draft has expectations (NAME.expect.toml; docs/expectations.md)")
    for name, why in report.skipped:
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
