"""N-gram drafts (--draft auto, local/drafting.py) on the real engine: the same greedy text as
without drafts, rejected cells removed, stop strings and grammars, cached == uncached, greedy
drafts that depend on nothing but their own prompt, and off where the memory cannot be cut."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from cached_prompts.backend.interface import GenerationRequest, PromptJob, reusable_length
from cached_prompts.local.backend import LocalBackend
from cached_prompts.local.drafting import DraftCost, DraftState, Drafting
from cached_prompts.local.generation import Branch, generate_branches
from cached_prompts.local.prelude_state import PRELUDE_SEQ
from cached_prompts.options import EngineOptions, SamplingOptions

from .conftest import missing_tool
from .model_fixtures import gemma3_270m_or_missing, write_mamba

LIST = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
REPEAT_PRELUDE = ("<|im_start|>system\nRepeat the user's list exactly, then say done.<|im_end|>\n<|im_start|>user\n"
                  f"{LIST}<|im_end|>\n<|im_start|>assistant\n{LIST}\ndone<|im_end|>\n<|im_start|>user\n")
REPEAT_PROMPT = f"{LIST} nu xi<|im_end|>\n<|im_start|>assistant\n"
OTHER_PROMPT = "omega psi chi phi upsilon tau sigma rho pi<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)
SAMPLED = SamplingOptions(max_tokens=16)
SEEDS = [1, 2, 3]


def backend_with(make_runner, cache: Path | None = None, draft: str = "auto") -> LocalBackend:
    return make_runner(cache, draft=draft)


def request(backend: LocalBackend, prompts: Sequence[str], sampling: SamplingOptions, seeds: list[int | None],
            prelude_text: str = REPEAT_PRELUDE, grammar: str | None = None) -> GenerationRequest:
    prelude = backend.prelude_tokens(prelude_text, "repeat")
    jobs = [PromptJob(backend.joint_tokens(prelude_text, p), list(seeds), grammar) for p in prompts]
    return GenerationRequest(prelude, jobs, sampling, "repeat")


def texts(completions) -> list[list[str]]:
    return [[c.text for c in job] for job in completions]


def test_greedy_with_drafts_is_greedy_without_and_drafts_are_counted(make_runner) -> None:
    drafting, plain = backend_with(make_runner), backend_with(make_runner, draft="off")
    with_drafts = drafting.generate(request(drafting, [REPEAT_PROMPT], GREEDY, [None]))
    assert texts(with_drafts) == texts(plain.generate(request(plain, [REPEAT_PROMPT], GREEDY, [None])))
    completion = with_drafts[0][0]
    assert LIST.split(" ", 2)[2] in completion.text
    assert 0 < completion.accepted_tokens <= completion.drafted_tokens
    counters = drafting.counters.public()
    assert (counters["drafted_tokens"], counters["accepted_tokens"]) == (completion.drafted_tokens,
                                                                          completion.accepted_tokens)
    assert plain.counters.drafted_tokens == 0 and plain.describe()["drafts"] == "off"
    assert drafting.describe()["drafts"] == "auto"


class WrongDrafts(Drafting):
    """Drafts tokens the model will not choose, and records, at each step, how many positions
    each sequence holds against how many it should (its tokens but the last, not yet decoded)."""

    def __init__(self, context, seqs: list[int]) -> None:
        super().__init__(DraftCost(0.0))
        self.context, self.seqs, self.held = context, seqs, []

    def propose(self, states: Sequence[DraftState], generated, room, capacity) -> list[list[int]]:
        for state, tokens, seq in zip(states, generated, self.seqs):
            state.catch_up(tokens)
            self.held.append((self.context.seq_length(seq), len(state.history) - 1))
        return [[7, 8, 9][:max(0, left)] for left in room]


def decode_with(backend: LocalBackend, prelude_text: str, prompt: str, sampling: SamplingOptions,
                drafting_for) -> tuple[str, object]:
    """One greedy output decoded straight with generate_branches and the given drafting."""
    prelude = backend.prelude_tokens(prelude_text, "p")
    full = backend.joint_tokens(prelude_text, prompt)
    backend.prepare_prelude(prelude, "p", store=False)
    seq = PRELUDE_SEQ + 1
    reused = reusable_length(prelude, full)

    def decode_tail(branch: int, target: int) -> None:
        backend.context.seq_copy(PRELUDE_SEQ, target, reused)
        backend.context.decode_sequence(full[reused:], reused, target)

    drafting = drafting_for(backend.context, [seq])
    branch = Branch([None], sampling.max_tokens, full, len(full))
    try:
        completion = generate_branches(backend.context, backend.model, [branch], sampling, decode_tail,
                                       first_seq=seq, drafting=drafting)[0][0]
    finally:
        backend.states.clear_outputs()
    return completion.text, drafting


def check_rejected_cells_are_removed(backend: LocalBackend, prelude_text: str, prompt: str,
                                     sampling: SamplingOptions) -> None:
    expected, _ = decode_with(backend, prelude_text, prompt, sampling, lambda context, seqs: None)
    text, drafting = decode_with(backend, prelude_text, prompt, sampling, WrongDrafts)
    assert drafting.totals.drafted > 0 and drafting.totals.accepted == 0
    assert len(drafting.held) > 3
    assert all(held == wanted for held, wanted in drafting.held), drafting.held
    assert text == expected


def test_rejected_draft_cells_are_removed(make_runner) -> None:
    check_rejected_cells_are_removed(make_runner(None), REPEAT_PRELUDE, REPEAT_PROMPT, GREEDY)


def test_stop_strings_and_grammars_hold_with_drafts(make_runner) -> None:
    drafting, plain = backend_with(make_runner), backend_with(make_runner, draft="off")
    stopping = GREEDY.model_copy(update={"stop": ["kappa"]})
    stopped = drafting.generate(request(drafting, [REPEAT_PROMPT], stopping, [None]))
    assert texts(stopped) == texts(plain.generate(request(plain, [REPEAT_PROMPT], stopping, [None])))
    assert stopped[0][0].text.endswith("iota ") and stopped[0][0].accepted_tokens > 0
    grammar = 'root ::= "alpha beta gamma delta " [a-z ]+ "!"'
    constrained = drafting.generate(request(drafting, [REPEAT_PROMPT], GREEDY, [None], grammar=grammar))
    assert texts(constrained) == texts(plain.generate(request(plain, [REPEAT_PROMPT], GREEDY, [None],
                                                              grammar=grammar)))
    text = constrained[0][0].text
    assert text.startswith("alpha beta gamma delta ") and set(text[23:].rstrip("!")) <= set("abcdefghijklmnopqrstuvwxyz ")
    assert constrained[0][0].drafted_tokens > 0


def test_cached_outputs_equal_uncached_ones_with_drafts(make_runner, tmp_path: Path) -> None:
    uncached = backend_with(make_runner)
    expected = texts(uncached.generate(request(uncached, [REPEAT_PROMPT, OTHER_PROMPT], SAMPLED, [None, *SEEDS])))
    for _ in range(2):  # computed and stored, then restored
        cached = backend_with(make_runner, tmp_path / "cache")
        assert texts(cached.generate(request(cached, [REPEAT_PROMPT, OTHER_PROMPT], SAMPLED,
                                             [None, *SEEDS]))) == expected
    assert cached.counters.sources == ["cache"] and cached.counters.accepted_tokens > 0


def test_a_greedy_output_drafts_from_its_own_prompt_only(make_runner) -> None:
    backend = backend_with(make_runner)
    alone = backend.generate(request(backend, [REPEAT_PROMPT], GREEDY, [None]))[0][0]
    # the other prompt's output comes first and repeats the same list: it must not change the drafts
    together = backend.generate(request(backend, [REPEAT_PROMPT.replace(" nu xi", ""), REPEAT_PROMPT],
                                        GREEDY, [None]))[1][0]
    assert (together.text, together.drafted_tokens, together.accepted_tokens) == (
        alone.text, alone.drafted_tokens, alone.accepted_tokens)


def test_drafts_are_off_where_the_memory_cannot_drop_cells(model_path: Path, tmp_path: Path) -> None:
    path = write_mamba(tmp_path / "mamba.gguf", model_path)
    backend = LocalBackend(EngineOptions(model_path=str(path), n_ctx=512, n_batch=128), None, n_parallel=2)
    try:
        assert backend.describe()["drafts"].startswith("off: a recurrent memory")
        backend.generate(request(backend, [REPEAT_PROMPT], GREEDY.model_copy(update={"max_tokens": 6}), [None, 1]))
        assert backend.counters.drafted_tokens == 0 and backend.counters.generated_tokens > 0
    finally:
        backend.close()


# ----- Gemma 3: sliding-window attention ------------------------------------------------------

GEMMA_LIST = " ".join(f"слово{i}" for i in range(40))
GEMMA_PRELUDE = ("<start_of_turn>user\nПовтори список.<end_of_turn>\n<start_of_turn>model\nХорошо.<end_of_turn>\n"
                 + f"<start_of_turn>user\n{GEMMA_LIST}<end_of_turn>\n<start_of_turn>model\n{GEMMA_LIST}<end_of_turn>\n"
                 * 3 + "<start_of_turn>user\n")  # longer than the 512-token window
GEMMA_PROMPT = f"{GEMMA_LIST}<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture(scope="module")
def gemma_backends() -> dict[str, LocalBackend]:
    path = gemma3_270m_or_missing()
    made = {draft: LocalBackend(EngineOptions(model_path=str(path), n_ctx=2048, n_batch=512, draft=draft), None,
                                n_parallel=2) for draft in ("auto", "off")}
    yield made
    for backend in made.values():
        backend.close()


def test_gemma_greedy_with_drafts_is_greedy_without(gemma_backends: dict[str, LocalBackend]) -> None:
    drafting, plain = gemma_backends["auto"], gemma_backends["off"]
    prelude = drafting.prelude_tokens(GEMMA_PRELUDE, "g")
    assert len(prelude) > drafting.model.architecture.n_swa
    outputs = {}
    for name, backend in gemma_backends.items():
        full = backend.joint_tokens(GEMMA_PRELUDE, GEMMA_PROMPT)
        outputs[name] = backend.generate(GenerationRequest(prelude, [PromptJob(full, [None])], GREEDY, "g"))[0][0]
    assert outputs["auto"].text == outputs["off"].text and outputs["auto"].accepted_tokens > 0
    assert plain.describe()["drafts"] == "off"


def test_gemma_rejected_draft_cells_are_removed(gemma_backends: dict[str, LocalBackend]) -> None:
    check_rejected_cells_are_removed(gemma_backends["auto"], GEMMA_PRELUDE, GEMMA_PROMPT, GREEDY)
