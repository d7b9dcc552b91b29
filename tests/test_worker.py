"""The local engine in a worker process (local/worker.py): the same Backend, and a crash of
the worker (a real SIGSEGV sent from outside, as a crash in llama.cpp would raise it) is an
error for the request or input in flight, not the end of the service or the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cached_prompts.backend.interface import Backend, PreludeKind
from cached_prompts.errors import ModelError, WorkerCrashError, WorkerGaveUpError
from cached_prompts.local.backend import LocalBackend
from cached_prompts.local.worker import MAX_DEATHS_IN_A_ROW, WorkerBackend
from cached_prompts.options import EngineOptions
from cached_prompts.backend.interface import GenerationRequest, PromptJob
from tests.conftest import GREEDY, PRELUDE, SAMPLED, generate, prompt_for, write

FLAGS = ["--lp-n-ctx", "2048", "--lp-n-batch", "256"]
LONG = 1200  # tokens the grammar below forces: the request is still decoding when the signal comes
LONG_GRAMMAR = f'root ::= [a-z]{{{LONG}}}'
WAIT_SECONDS = 300


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def the_worker(parent: int) -> int:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        workers = children(parent)
        if len(workers) == 1:
            return workers[0]
        time.sleep(0.05)
    raise AssertionError(f"process {parent} has no single worker: {children(parent)}")


def segfault_when_busy(worker: int) -> None:
    """SIGSEGV to the worker once it works on what was just sent (its CPU time grows)."""
    start = cpu_ticks(worker)
    deadline = time.monotonic() + WAIT_SECONDS
    while cpu_ticks(worker) < start + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(worker, signal.SIGSEGV)


# ----- the same backend -------------------------------------------------------------------------


def test_every_method_local_backend_overrides_runs_in_the_worker() -> None:
    """A method of LocalBackend that overrides a Backend default must be proxied explicitly
    (else the default would run here); other public methods pass through __getattr__."""
    overridden = {name for name, value in vars(LocalBackend).items()
                  if not name.startswith("_") and hasattr(Backend, name) and name != "kind"}
    assert overridden and overridden <= set(vars(WorkerBackend)), overridden - set(vars(WorkerBackend))


def test_a_model_that_does_not_load_is_the_same_error(tmp_path: Path) -> None:
    options = EngineOptions(model_path=str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError) as local:
        LocalBackend(options, None)
    with pytest.raises(ModelError) as worker:
        WorkerBackend(options, None)
    assert str(worker.value) == str(local.value)


def test_the_worker_answers_as_the_engine_here_and_mirrors_counters_callbacks_and_logs(
        tmp_path: Path, small_options: EngineOptions, caplog: pytest.LogCaptureFixture) -> None:
    prompt = prompt_for("river")
    with LocalBackend(small_options, tmp_path / "here", n_parallel=8) as here, \
            WorkerBackend(small_options, tmp_path / "there", n_parallel=8) as there:
        results = []
        for backend in (here, there):
            prelude = backend.prelude_tokens(PRELUDE, "p")
            texts = generate(backend, prelude, backend.joint_tokens(PRELUDE, prompt),
                             GREEDY.model_copy(update={"max_tokens": 1000}), [None])
            backend.unload()  # a LocalBackend-only method: through __getattr__
            prefills: list[tuple[int, int]] = []
            load = backend.prepare_prelude(prelude, "p", on_prefill=lambda *a: prefills.append(a))
            backend.unload()
            steps: list[int] = []
            request = GenerationRequest(prelude, [PromptJob(backend.joint_tokens(PRELUDE, prompt), [1, 2])],
                                        SAMPLED, "p", store=False)
            sampled = backend.generate(request, on_step=steps.append)
            assert sum(steps) == sum(c.tokens for c in sampled[0]) > 0
            results.append((texts, load, sampled, sum(steps), backend.counters.public(), backend.counters.sources,
                            backend.kept_preludes(PreludeKind.PRELUDE), backend.model_id, backend.n_ctx))
        assert results[0] == results[1]
        warnings = [r for r in caplog.records if "tokens of context left for each answer" in r.getMessage()]
        assert [r.levelname for r in warnings] == ["WARNING", "WARNING"]  # here and there (forwarded)
        described = there.describe()
        assert described["worker_pid"] in children(os.getpid()) and described["worker_restarts"] == 0
        assert described["model_sha256"] == here.describe()["model_sha256"]
        with pytest.raises(AttributeError):
            there.no_such_method  # noqa: B018


def test_a_killed_worker_is_an_error_naming_the_signal_and_a_new_one_has_the_kept_preludes(
        tmp_path: Path, small_options: EngineOptions) -> None:
    with WorkerBackend(small_options, tmp_path / "cache", n_parallel=8) as backend:
        prelude = backend.prelude_tokens(PRELUDE, "kept")
        backend.keep_prelude("kept", prelude, PreludeKind.EXTERNAL)
        first = backend.worker_pid
        request = GenerationRequest(prelude, [PromptJob(backend.joint_tokens(PRELUDE, prompt_for("river")), [None])],
                                    GREEDY.model_copy(update={"max_tokens": 50}), "kept", kind=PreludeKind.EXTERNAL)
        with pytest.raises(WorkerCrashError) as crash:
            backend.generate(request, on_step=lambda n: os.kill(first, signal.SIGSEGV))
        assert crash.value.signal_name == "SIGSEGV"
        message = str(crash.value)
        assert f"worker (pid {first}) was killed by SIGSEGV" in message
        assert "the decoding of the outputs for 'kept'" in message
        assert backend.worker_pid != first and backend.describe()["worker_restarts"] == 1
        assert [p.label for p in backend.kept_preludes(PreludeKind.EXTERNAL)] == ["kept"]
        assert backend.generate(request)[0][0].text  # the next request is answered
        assert backend.counters.sources[-1] == "cache"  # the state came back from the disk cache

        for death in range(1, MAX_DEATHS_IN_A_ROW + 1):  # dies again at once, N times in a row
            os.kill(backend.worker_pid, signal.SIGKILL)
            expected = WorkerGaveUpError if death == MAX_DEATHS_IN_A_ROW else WorkerCrashError
            with pytest.raises(expected, match="was killed by SIGKILL .* during the tokenization"):
                backend.tokenize("abc", at_start=True)
        with pytest.raises(WorkerGaveUpError, match=f"died {MAX_DEATHS_IN_A_ROW} times in a row"):
            backend.tokenize("abc", at_start=True)


# ----- through real processes: the JSON service and a workspace command --------------------------


def line(command: str, request_id: object, **arguments: object) -> bytes:
    return (json.dumps({"command": command, "arguments": arguments, "id": request_id}) + "\n").encode()


class Service:
    """`stdio-json-repl` in a child process, one request at a time."""

    def __init__(self, root: Path, stderr) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "cached_prompts", "--root", str(root), *FLAGS,
                                         "stdio-json-repl"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=stderr)

    def send(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def answer(self) -> dict:
        return json.loads(self.process.stdout.readline())

    def ask(self, data: bytes) -> dict:
        self.send(data)
        return self.answer()

    def close(self) -> int:
        if self.process.poll() is None:
            self.process.stdin.close()
        return self.process.wait(timeout=WAIT_SECONDS)


def test_the_service_answers_after_its_worker_is_killed_mid_request(tmp_path: Path) -> None:
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        service = Service(tmp_path, stderr)
        try:
            assert service.ask(line("precache", 1, prelude_id="dict", prelude=PRELUDE))["status"] == "Ok"
            worker = the_worker(service.process.pid)
            service.send(line("single_prompt", 2, prelude_id="dict", prelude=PRELUDE, prompt=prompt_for("river"),
                              grammar=LONG_GRAMMAR, inference_parameters={"max_tokens": LONG}))
            segfault_when_busy(worker)
            crashed = service.answer()
            # the lines after it: each answered, in order
            service.send(line("count_tokens", 3, text="hello") + line("list_preludes", 4) + line("info", 5)
                         + line("single_prompt", 6, prelude_id="dict", prelude=PRELUDE, prompt=prompt_for("river"),
                                inference_parameters={"max_tokens": 4}))
            later = [service.answer() for _ in range(4)]
            assert service.ask(line("shutdown", 7))["status"] == "Ok"
        finally:
            code = service.close()
    assert code == 0
    assert crashed["status"] == "SystemError" and crashed["id"] == 2 and crashed["value"] is None
    assert f"worker (pid {worker}) was killed by SIGSEGV (Segmentation fault) during" in crashed["message"]
    assert "'dict'" in crashed["message"] and "a new worker" in crashed["message"]
    assert [(r["status"], r["id"]) for r in later] == [("Ok", 3), ("Ok", 4), ("Ok", 5), ("Ok", 6)]
    assert [p["prelude_id"] for p in later[1]["value"]] == ["dict"]
    info = later[2]["value"]
    assert info["worker_restarts"] == 1 and info["worker_pid"] != worker
    assert info["counters"]["preludes_computed"] == 1  # after the crash the state came from the disk cache
    assert "Segmentation fault" not in (tmp_path / "stderr.txt").read_text().replace(
        "SIGSEGV (Segmentation fault)", "")


def test_a_worker_that_dies_again_and_again_ends_the_service_with_status_1(tmp_path: Path) -> None:
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        service = Service(tmp_path, stderr)
        try:
            assert service.ask(line("info", "ready"))["status"] == "Ok"  # the first worker has loaded the model
            answers = []
            for death in range(MAX_DEATHS_IN_A_ROW):
                os.kill(the_worker(service.process.pid), signal.SIGKILL)
                answers.append(service.ask(line("count_tokens", death, text="hello")))
            service.send(line("info", "after"))  # not answered: the service has stopped
        finally:
            code = service.close()
    assert code == 1
    assert [a["status"] for a in answers] == ["SystemError"] * MAX_DEATHS_IN_A_ROW
    assert "the service stops" in answers[-1]["message"] and "3 times in a row" in answers[-1]["message"]
    err = (tmp_path / "stderr.txt").read_text()
    assert "error: the llama.cpp worker" in err and "stdio-json-repl stops" in err


def test_a_killed_worker_costs_the_input_in_flight_and_the_others_are_made(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    for word in ("library", "river", "umbrella"):
        write(root / "test_prompts" / f"dictionary---{word}.txt", prompt_for(word))
    write(root / "test_prompts" / "dictionary---library.gbnf", LONG_GRAMMAR)  # the first: a long one
    outputs = root / "test_prompts_outputs"
    write(outputs / "dictionary---earlier.output-deterministic.txt", "made before")
    command = [sys.executable, "-m", "cached_prompts", "--root", str(root), *FLAGS, "outputs-test-prompts",
               "--deterministic", "--max-tokens", str(LONG)]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    err_lines = []
    try:
        for text in run.stderr:
            err_lines.append(text)
            if text.startswith("[1/3] test_prompts/dictionary---library.txt"):
                segfault_when_busy(the_worker(run.pid))
    finally:
        code = run.wait(timeout=WAIT_SECONDS)
    err = "".join(err_lines)
    assert code == 1, err
    failed = [text for text in err_lines if text.startswith("error:")]
    assert len(failed) == 1, err
    assert failed[0].startswith("error: failed dictionary---library.txt: the llama.cpp worker (pid ")
    assert "was killed by SIGSEGV (Segmentation fault) during" in failed[0]
    assert sorted(p.name for p in outputs.glob("*.txt")) == [
        "dictionary---earlier.output-deterministic.txt", "dictionary---river.output-deterministic.txt",
        "dictionary---umbrella.output-deterministic.txt"]
    assert (outputs / "dictionary---earlier.output-deterministic.txt").read_text() == "made before"
    assert "outputs: 2 written; inputs: 0 up to date, 1 skipped" in err


def test_a_callback_that_raises_stops_the_call_and_the_same_worker_goes_on(
        tmp_path: Path, small_options: EngineOptions) -> None:
    """watch stops a generation from its on_step callback when an input changes: the worker
    stops the call at its next callback and stays (no restart, no model reload)."""
    class Changed(Exception):
        pass

    def stop(n: int) -> None:
        raise Changed("an input changed")

    with WorkerBackend(small_options, tmp_path / "cache", n_parallel=8) as backend:
        prelude = backend.prelude_tokens(PRELUDE, "p")
        request = GenerationRequest(prelude, [PromptJob(backend.joint_tokens(PRELUDE, prompt_for("river")), [None])],
                                    GREEDY.model_copy(update={"max_tokens": 200}), "p")
        pid = backend.worker_pid
        with pytest.raises(Changed):
            backend.generate(request, on_step=stop)
        assert backend.counters.generated_tokens < 5  # stopped at once, not decoded to the end
        assert backend.generate(request)[0][0].text
        assert backend.worker_pid == pid and backend.restarts == 0
