"""Outputs streamed as they are decoded (Backend.generate's on_text): the pieces add up to each
completion's text, stop strings never show, and every job and seed hears its own text."""

from __future__ import annotations

from cached_prompts.backend.interface import GenerationRequest, PromptJob
from cached_prompts.local.generation import TextCollector
from cached_prompts.options import SamplingOptions

from .conftest import PRELUDE, prompt_for


def test_streamed_pieces_add_up_to_every_output_of_every_job(make_runner) -> None:
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    fulls = [runner.joint_tokens(PRELUDE, prompt_for(word)) for word in ("river", "library")]
    sampling = SamplingOptions(max_tokens=24, stop=[" the"])
    request = GenerationRequest(prelude, [PromptJob(fulls[0], [None, 7, 8]), PromptJob(fulls[1], [7, 9])],
                                sampling, "p")
    streamed: dict[tuple[int, int], str] = {}
    events: list[tuple[int, int]] = []

    def on_text(job: int, seed_index: int, text: str) -> None:
        streamed[(job, seed_index)] = streamed.get((job, seed_index), "") + text
        events.append((job, seed_index))

    completions = runner.generate(request, on_text=on_text)
    whole = {(j, k): c.text for j, job in enumerate(completions) for k, c in enumerate(job)}
    assert streamed == {key: text for key, text in whole.items() if text}
    assert all(" the" not in text for text in streamed.values())
    assert len(events) > len(streamed)  # piece by piece, not whole at the end


def test_text_that_may_still_become_a_stop_string_is_held_back() -> None:
    collector = TextCollector(["STOP"])
    shown = ""
    for piece in (b"ab", b"cS", b"T", b"O", b"P tail"):
        collector.add(piece)
        shown += collector.take_new()
        assert "S" not in shown
    shown += collector.take_new(final=True)
    assert shown == collector.finish() == "abc"


def test_llama_server_streams_each_output_and_the_pieces_add_up(llama_servers, tmp_path) -> None:
    from cached_prompts.options import ServerOptions
    from cached_prompts.server.backend import ServerBackend

    server = llama_servers(parallel=3)
    with ServerBackend(ServerOptions(servers=[server.url], server_api="llama"), None, fallback_n_ctx=1024) as backend:
        prelude = backend.prelude_tokens(PRELUDE, "p")
        full = backend.joint_tokens(PRELUDE, prompt_for("river"))
        request = GenerationRequest(prelude, [PromptJob(full, [None, 7, 8])], SamplingOptions(max_tokens=12), "p")
        streamed: dict[int, list[str]] = {}
        completions = backend.generate(request, on_text=lambda job, k, text: streamed.setdefault(k, []).append(text))
    assert {k: "".join(pieces) for k, pieces in streamed.items()} == \
        {k: c.text for k, c in enumerate(completions[0]) if c.text}
    assert any(len(pieces) > 1 for pieces in streamed.values())  # token by token, not whole
