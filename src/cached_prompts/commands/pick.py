"""`pick DRAFT`: the seed's step "pick the answer you like and put it in the prelude", by
measurement. Each output K of the draft is a candidate; its prelude is what `promote DRAFT K`
would write (draft + output K + the opening of the next user turn), held in memory. For each,
the test prompts `PRELUDE---*.txt` get N sampled answers (or one greedy), checked against
their expectations (expectations.py); candidates are ranked by pass rate, ties by how natural
their example is to the model (score-preludes' measure; local engine).

Reuse: the draft's state is prepared once and every candidate is built on it (the backend's
prefix reuse: only the candidate's answer and the next turn are evaluated, see
local/prelude_state.py); each candidate's prompts decode together in one request; no
candidate's state is stored (store=False), so nothing of them is left in llm_cache/ unless
one is promoted (and then only as a prelude file).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cached_prompts.backend.interface import Backend, GenerationRequest, PreludeKind, PromptJob
from cached_prompts.commands.outputs import SKIPPABLE, output_keys, seeds_for
from cached_prompts.errors import InputFileError, OptionsError, UnsupportedByBackendError
from cached_prompts.method.checking import Answer, Rate, failures
from cached_prompts.method.constraints import load_constraint
from cached_prompts.method.expectations import Expectations, for_test_prompt
from cached_prompts.method.promote import Promoted, check_prelude_target, draft_path_of, promote, promoted_text
from cached_prompts.method.scoring import last_example_logprob
from cached_prompts.options import SamplingOptions
from cached_prompts.workspace.layout import DRAFTS, PRELUDE_SEPARATOR, TEST_PROMPTS, Workspace, read_input_text
from cached_prompts.workspace.outputs import OutputSet

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    key: int  # the draft's output K
    prelude: str = ""  # what promote would write for it
    passed: int = 0
    total: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # check name -> outputs failing it
    below: list[str] = field(default_factory=list)  # test prompts under their threshold
    naturalness: float | None = None  # mean log-probability of its example; only to break ties
    problem: str = ""  # why it could not be tried

    @property
    def rate(self) -> Rate:
        return Rate(self.passed, self.total)

    @property
    def reaches_thresholds(self) -> bool:
        return not self.problem and self.total > 0 and not self.below


@dataclass
class PickResult:
    draft: str  # prelude_drafts/D.txt
    prelude: str  # the PRELUDE whose test prompts were run
    prompts: list[str]  # test_prompts/PRELUDE---*.txt used
    outputs_per_prompt: int
    candidates: list[Candidate]  # best first
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test prompt, why)
    promoted: Promoted | None = None

    @property
    def winner(self) -> Candidate | None:
        """The best candidate, if it reaches every prompt's threshold."""
        best = self.candidates[0] if self.candidates else None
        return best if best is not None and best.reaches_thresholds else None

    @property
    def distinguishable(self) -> bool:
        """False when the top two candidates' 95% intervals overlap."""
        tried = [c for c in self.candidates if not c.problem]
        return len(tried) < 2 or not tried[0].rate.overlaps(tried[1].rate)


@dataclass
class _Prompt:
    path: Path
    text: str
    expectations: Expectations
    grammar: str | None


def pick(workspace: Workspace, backend: Backend, draft: str, sampling: SamplingOptions, *,
         prelude_name: str | None = None, n: int = 5, deterministic: bool = False,
         promote_as: str | None = None, promote_winner: bool = False, force: bool = False,
         next_turn: str | None = None) -> PickResult:
    """Rank the draft's outputs as example answers (see the module's docstring); with
    `promote_winner`, write the winner as `promote` does (to preludes/`promote_as`.txt,
    default: the PRELUDE name)."""
    if n < 1:
        raise OptionsError(f"-n {n}: the number of answers must be at least 1")
    draft_path = draft_path_of(workspace, draft)
    name = prelude_name if prelude_name is not None else draft_path.stem
    target_name = promote_as if promote_as is not None else name
    if promote_winner:
        check_prelude_target(workspace, target_name, force)  # before any work: a name taken fails now
    result = PickResult(f"{DRAFTS}/{draft_path.name}", name, [], 1 if deterministic else n, [])
    prompts = _test_prompts(workspace, backend, name, result)
    result.candidates = [Candidate(key) for key in _candidate_keys(workspace, draft_path)]
    draft_text = read_input_text(draft_path)
    draft_tokens = backend.prelude_tokens(draft_text, result.draft)
    # The draft's state once; every candidate's prelude starts with it (store=False: a draft's
    # state is not kept, as outputs-for-drafts does not keep it).
    backend.prepare_prelude(draft_tokens, f"draft {draft_path.stem}", kind=PreludeKind.DRAFT, store=False)
    keys = output_keys(n, deterministic)
    for candidate in result.candidates:
        answer = read_input_text(OutputSet.for_draft(workspace, draft_path).path(candidate.key))
        candidate.prelude = promoted_text(draft_path, draft_text, answer, next_turn).text
        try:
            _try(backend, candidate, prompts, sampling, keys, f"pick {draft_path.stem} {candidate.key}")
        except SKIPPABLE as error:
            candidate.problem = str(error)
            log.error("candidate %d: %s", candidate.key, error)
    _rank(backend, result, f"draft {draft_path.stem}")
    if promote_winner and result.winner is not None:
        result.promoted = promote(workspace, draft_path.stem, result.winner.key, name=target_name, force=force,
                                  next_turn=next_turn)
    return result


def _test_prompts(workspace: Workspace, backend: Backend, name: str, result: PickResult) -> list[_Prompt]:
    """The test prompts PRELUDE---*.txt that have expectations (the others cannot rank anything)."""
    prefix = f"{name}{PRELUDE_SEPARATOR}"
    prompts, unchecked = [], []
    for path in workspace.test_prompt_files():
        if not path.stem.startswith(prefix):
            continue
        shown = f"{TEST_PROMPTS}/{path.name}"
        try:
            expectations = for_test_prompt(workspace, path, name)
            if expectations is None:
                unchecked.append(shown)
                continue
            prompts.append(_Prompt(path, read_input_text(path), expectations, load_constraint(path, backend)))
        except SKIPPABLE as error:
            log.error("skipped %s: %s", shown, error)
            result.skipped.append((shown, str(error)))
    if unchecked:
        log.warning("%s: no expectations, not used to rank (add %s.expect.toml)", ", ".join(unchecked), name)
    if not prompts:
        raise InputFileError(f"no test prompt {TEST_PROMPTS}/{prefix}*.txt with expectations; write some and "
                             f"their expectations (preludes/{name}.expect.toml or {TEST_PROMPTS}/"
                             f"{prefix}ID.expect.toml, docs/expectations.md)")
    result.prompts = [f"{TEST_PROMPTS}/{p.path.name}" for p in prompts]
    return prompts


def _candidate_keys(workspace: Workspace, draft_path: Path) -> list[int]:
    keys = sorted(int(key) for key in OutputSet.for_draft(workspace, draft_path).existing() if key.isdigit())
    if not keys:
        raise InputFileError(f"{DRAFTS}/{draft_path.name} has no outputs to pick from; run outputs-for-drafts first")
    return keys


def _try(backend: Backend, candidate: Candidate, prompts: list[_Prompt], sampling: SamplingOptions,
         keys: list[int | str], label: str) -> None:
    """One request for all the candidate's prompts (decoded together), checked."""
    tokens = backend.prelude_tokens(candidate.prelude, f"{label} (candidate prelude)")
    jobs = []
    for prompt in prompts:
        full = backend.joint_tokens(candidate.prelude, prompt.text)
        backend.check_fits(tokens, full)
        jobs.append(PromptJob(full, seeds_for(keys, sampling), prompt.grammar))
    request = GenerationRequest(tokens, jobs, sampling, label, kind=PreludeKind.DRAFT, store=False)
    for prompt, completions in zip(prompts, backend.generate(request)):
        passed = 0
        for completion in completions:
            failed = failures(prompt.expectations, Answer(completion.text, completion.tokens, completion.stop_reason))
            candidate.failed.update(f.name for f in failed)
            passed += not failed
        candidate.passed += passed
        candidate.total += len(completions)
        if not Rate(passed, len(completions)).reaches(prompt.expectations.threshold):
            candidate.below.append(f"{TEST_PROMPTS}/{prompt.path.name}")


def _rank(backend: Backend, result: PickResult, label: str) -> None:
    """By pass rate; candidates tied on it by the naturalness of their example (local engine)."""
    tried = [c for c in result.candidates if not c.problem]
    rates = Counter((c.passed, c.total) for c in tried)
    tied = [c for c in tried if rates[(c.passed, c.total)] > 1]
    try:
        for candidate in tied:
            candidate.naturalness = last_example_logprob(backend, candidate.prelude, label)
    except UnsupportedByBackendError:
        log.info("candidates with the same pass rate stay in output order: their naturalness needs the "
                 "local engine (no --server)")

    def order(candidate: Candidate) -> tuple[bool, float, float, int]:
        rate = candidate.rate.rate
        natural = candidate.naturalness if candidate.naturalness is not None else float("-inf")
        return (bool(candidate.problem), -(rate if rate is not None else -1.0), -natural, candidate.key)

    result.candidates.sort(key=order)


# ----- rendering --------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def advice(result: PickResult) -> str:
    """What to do when the top two cannot be told apart ('' when they can)."""
    if result.distinguishable:
        return ""
    n = result.outputs_per_prompt
    more = max(20, 4 * n)
    if n == 1:
        return f"not distinguishable with one greedy output per prompt: try -n {more}"
    return f"not distinguishable with N={n}: try -n {more}"


def render_text(result: PickResult) -> str:
    lines = [f"pick {result.draft} for {result.prelude}: {len(result.candidates)} candidates x "
             f"{len(result.prompts)} test prompts x {result.outputs_per_prompt} outputs",
             f"  {'output':>6}  {'passed':>9}  {'rate':>5}  {'95% interval':>13}  failing checks"]
    for candidate in result.candidates:
        if candidate.problem:
            lines.append(f"  {candidate.key:>6}  not tried: {candidate.problem}")
            continue
        low, high = candidate.rate.interval
        failing = ", ".join(f"{name} ({count})" for name, count in candidate.failed.most_common())
        lines.append(f"  {candidate.key:>6}  {f'{candidate.passed}/{candidate.total}':>9}  "
                     f"{_percent(candidate.rate.rate):>5}  {f'[{_percent(low)}, {_percent(high)}]':>13}  {failing}")
    winner = result.winner
    if winner is None:
        lines.append("no candidate reaches every test prompt's threshold")
    else:
        lines.append(f"winner: output {winner.key}" + (f", promoted to {result.promoted.path.parent.name}/"
                                                       f"{result.promoted.path.name}" if result.promoted else ""))
    if advice(result):
        lines.append(advice(result))
    return "\n".join(lines)


def to_json(result: PickResult) -> dict[str, object]:
    def candidate_json(candidate: Candidate) -> dict[str, object]:
        low, high = candidate.rate.interval
        data: dict[str, object] = {"output": candidate.key, "passed": candidate.passed, "total": candidate.total,
                                   "rate": candidate.rate.rate, "interval": [low, high],
                                   "failed": dict(candidate.failed.most_common())}
        if candidate.naturalness is not None:
            data["naturalness"] = candidate.naturalness
        if candidate.problem:
            data["problem"] = candidate.problem
        return data

    return {"draft": result.draft, "for": result.prelude, "prompts": result.prompts,
            "candidates": [candidate_json(c) for c in result.candidates],
            "winner": result.winner.key if result.winner else None,
            "distinguishable": result.distinguishable,
            "promoted": result.promoted.path.relative_to(result.promoted.path.parent.parent).as_posix()
            if result.promoted else None}
