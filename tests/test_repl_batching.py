"""`stdio-json-repl --batch-waiting` when a joined generation fails: each request gets its own
outcome (answer or error) in its own response line, in order, and the failure of a request
decoded alone is its answer: it is not generated a second time.

The engine is the real one on the real model; only the failure is injected (a real engine
does not fail on one chosen prompt): `FailingBackend` passes every call through, and fails
`generate` for a request holding the prompt "poison", with the error a test chooses."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cached_prompts.backend.interface import Backend, GenerationRequest
from cached_prompts.errors import EngineError, WorkerCrashError, WorkerGaveUpError
from cached_prompts.local.backend import LocalBackend
from cached_prompts.options import SamplingOptions
from cached_prompts.repl.batching import LineReader, run_batching_loop
from cached_prompts.repl.serve import read_lines
from cached_prompts.repl.session import Session

from .conftest import PRELUDE, prompt_for

POISON = "poison"
DEFAULTS = SamplingOptions(max_tokens=4)


class FailingBackend:
    """A backend that fails `generate` for a request with the prompt POISON; counts its calls."""

    def __init__(self, backend: Backend, error: Callable[[], Exception]) -> None:
        self.backend = backend
        self.error = error
        self.poison = backend.joint_tokens(PRELUDE, POISON)
        self.generated: list[int] = []  # jobs of each generate call, in order

    def generate(self, request: GenerationRequest) -> Any:
        self.generated.append(len(request.jobs))
        if any(job.full == self.poison for job in request.jobs):
            raise self.error()
        return self.backend.generate(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def line(request_id: Any, prompt: str, **arguments: Any) -> str:
    return json.dumps({"id": request_id, "command": "single_prompt",
                       "arguments": {"prelude_id": "dict", "prelude": PRELUDE, "prompt": prompt,
                                     "number_of_random_outputs": 2, **arguments}})


def serve(backend: FailingBackend, tmp_path: Path, lines: list[str]) -> tuple[int, list[dict[str, Any]]]:
    """The batching loop over `lines` (all waiting from the start): its status and responses."""
    stdin = tmp_path / "requests.jsonl"
    stdin.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stdout = io.BytesIO()
    with stdin.open("rb") as requests:
        reader = LineReader(requests.fileno())
        status = run_batching_loop(Session(backend, DEFAULTS), reader, read_lines(reader), stdout)
    return status, [json.loads(text) for text in stdout.getvalue().decode("utf-8").splitlines()]


@pytest.fixture
def backend(make_runner: Callable[..., LocalBackend], tmp_path: Path) -> LocalBackend:
    return make_runner(tmp_path / "llm_cache", n_threads=1)


def test_a_failing_joined_request_gives_each_line_its_own_answer_or_error(backend, tmp_path: Path) -> None:
    failing = FailingBackend(backend, lambda: EngineError("injected failure"))
    status, responses = serve(failing, tmp_path, [
        line(0, prompt_for("river")), line(1, POISON), line(2, prompt_for("library")), '{id: "i", command: "info"}'])
    assert status == 0
    assert [(r["id"], r["status"]) for r in responses] == [(0, "Ok"), (1, "SystemError"), (2, "Ok"), ("i", "Ok")]
    assert responses[1] == {"status": "SystemError", "value": None, "message": "injected failure", "id": 1}
    assert all(len(r["value"]) == 2 for r in (responses[0], responses[2]))
    assert failing.generated == [3, 1, 1, 1]  # together, then each alone once
    assert responses[3]["value"]["counters"]["requests_batched"] == 0  # none was answered from the joined one


def test_a_request_that_fails_alone_is_generated_once(backend, tmp_path: Path) -> None:
    failing = FailingBackend(backend, lambda: EngineError("injected failure"))
    status, responses = serve(failing, tmp_path, [line("p", POISON), line("q", POISON, inference_parameters={"seed": 3})])
    assert status == 0
    assert [(r["id"], r["message"]) for r in responses] == [("p", "injected failure"), ("q", "injected failure")]
    assert failing.generated == [1, 1]


def test_the_request_that_crashes_the_engine_gets_the_crash_and_the_others_their_answers(
        backend, tmp_path: Path) -> None:
    failing = FailingBackend(backend, lambda: WorkerCrashError("the worker crashed; a new worker is running"))
    status, responses = serve(failing, tmp_path, [line(0, POISON), line(1, prompt_for("river"))])
    assert status == 0
    assert [(r["id"], r["status"]) for r in responses] == [(0, "SystemError"), (1, "Ok")]
    assert "the worker crashed" in responses[0]["message"]
    assert failing.generated == [2, 1, 1]


def test_an_engine_that_gave_up_fails_every_waiting_request_and_ends_the_service(backend, tmp_path: Path) -> None:
    failing = FailingBackend(backend, lambda: WorkerGaveUpError("the worker died 3 times in a row"))
    status, responses = serve(failing, tmp_path, [line(0, prompt_for("river")), line(1, POISON)])
    assert status == 1
    assert [(r["id"], r["status"]) for r in responses] == [(0, "SystemError"), (1, "SystemError")]
    assert all(r["message"] == "the worker died 3 times in a row; the service stops" for r in responses)
    assert failing.generated == [2]  # not tried again
