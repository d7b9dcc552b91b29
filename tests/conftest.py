"""Every shared fixture and helper, in one place: the real engine on the real tiny model
(SmolLM2-135M-Instruct), a small workspace, the CLI run in-process, and real llama-servers.

A test module tunes the shared fixtures with module attributes instead of redefining them:
`CLI_FLAGS` go before the arguments of every `cli(...)` call, `RUNNER_OPTIONS` are engine
options of every `make_runner(...)` backend (a call's own options win)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cached_prompts.local.model_file import default_model_path
from cached_prompts.options import EngineOptions, SamplingOptions
from cached_prompts.backend.interface import GenerationRequest, PreludeKind, PromptJob
from cached_prompts.local.backend import LocalBackend

CHATML_SYSTEM = ("<|im_start|>system\nYou are a concise dictionary. For each word, reply with one "
                 "sentence that defines it.<|im_end|>\n<|im_start|>user\n")
PRELUDE = (CHATML_SYSTEM + "apple<|im_end|>\n<|im_start|>assistant\nA round fruit with crisp white "
           "flesh.<|im_end|>\n<|im_start|>user\n")


def prompt_for(word: str) -> str:
    return f"{word}<|im_end|>\n<|im_start|>assistant\n"


GREEDY = SamplingOptions(temperature=0.0, max_tokens=6)
SAMPLED = SamplingOptions(max_tokens=6)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def small_options() -> EngineOptions:
    return EngineOptions(n_ctx=1024, n_batch=256)


@pytest.fixture
def make_runner(small_options: EngineOptions, request: pytest.FixtureRequest) -> Iterator[Callable[..., LocalBackend]]:
    """Local backends closed at the end of the test; `make_runner(cache_dir)` or `make_runner(None)`."""
    made: list[LocalBackend] = []
    module_options = getattr(request.module, "RUNNER_OPTIONS", {})

    def make(cache_dir: Path | None, **options: object) -> LocalBackend:
        runner = LocalBackend(small_options.model_copy(update={**module_options, **options}), cache_dir, n_parallel=8)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


def generate_many(backend, prelude: list[int], fulls: list[list[int]], sampling: SamplingOptions,
                  seeds: list[list[int | None]], *, label: str = "p", store: bool = True,
                  kind: PreludeKind = PreludeKind.PRELUDE) -> list[list[str]]:
    """The texts of `backend.generate` for several prompts (joint tokens) of one prelude."""
    request = GenerationRequest(prelude, [PromptJob(full, list(s)) for full, s in zip(fulls, seeds)], sampling,
                                label, kind=kind, store=store)
    return [[c.text for c in completions] for completions in backend.generate(request)]


def generate(backend, prelude: list[int], full: list[int], sampling: SamplingOptions,
             seeds: list[int | None], **kwargs: object) -> list[str]:
    """The texts of one prompt's outputs, one per seed (None = greedy)."""
    return generate_many(backend, prelude, [full], sampling, [seeds], **kwargs)[0]


def missing_tool(reason: str) -> None:
    """Skip a test whose real tool (browser, server build, second model) is not installed;
    under CI, which installs them all (.ci/run), fail instead, so nothing is silently skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small workspace: one draft, two preludes (one extends the other), three prompts."""
    root = tmp_path / "ws"
    write(root / "prelude_drafts" / "dictionary.txt", CHATML_SYSTEM + "apple<|im_end|>\n<|im_start|>assistant\n")
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    write(root / "preludes" / "dictionary-long.txt",
          PRELUDE + "bicycle<|im_end|>\n<|im_start|>assistant\nA vehicle with two wheels.<|im_end|>\n"
          "<|im_start|>user\n")
    write(root / "test_prompts" / "dictionary---river.txt", prompt_for("river"))
    write(root / "test_prompts" / "dictionary---library.txt", prompt_for("library"))
    write(root / "test_prompts" / "dictionary-long---umbrella.txt", prompt_for("umbrella"))
    return root


def age(path: Path, seconds: float = 100.0) -> None:
    """Make a file look older, so freshness checks do not depend on timestamp resolution."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - int(seconds * 1e9)))


def age_tree(root: Path, seconds: float = 100.0) -> None:
    for path in root.rglob("*.txt"):
        age(path, seconds)


CLI_OPTIONS = EngineOptions(n_ctx=1024, n_batch=256)  # what the `cli` fixture's flags give


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> Callable[..., tuple[int, str, str]]:
    """Run the CLI in-process on a workspace: `cli(root, "outputs-test-prompts", "-n", "2")`."""
    from cached_prompts.cli.main import main

    module_flags = tuple(getattr(request.module, "CLI_FLAGS", ()))

    def run(root: Path, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--root", str(root), "--lp-n-ctx", "1024", "--lp-n-batch", "256", *module_flags, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def cli_backend() -> Iterator[Callable[[Path], LocalBackend]]:
    """A backend built as the `cli` fixture's flags build it, on a workspace's cache; closed
    at the end."""
    made: list[LocalBackend] = []

    def make(root: Path) -> LocalBackend:
        made.append(LocalBackend(CLI_OPTIONS, root / "llm_cache"))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def llama_servers(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """`start(**options)` starts a real llama-server (tests/server_fixtures.py); all of them are
    stopped after the test, also when it fails."""
    from .server_fixtures import LlamaServer, llama_server_binary

    binary = llama_server_binary()
    if binary is None:
        missing_tool("llama-server is not built; run `make llama-server`")
    started: list[LlamaServer] = []

    def start(**options: object) -> LlamaServer:
        server = LlamaServer(binary, tmp_path, **options)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def canned_server() -> Iterator[object]:
    """A canned HTTP server on 127.0.0.1 (tests/server_fixtures.py: CannedServer), for answers a
    real server cannot be made to send; stopped after the test."""
    from .server_fixtures import CannedServer

    server = CannedServer()
    try:
        yield server
    finally:
        server.stop()


CHROMIUM = shutil.which("chromium")  # Debian's chromium, driven by Playwright


@pytest.fixture
def browser() -> Iterator[object]:
    """A real headless Chromium (Playwright), closed after the test."""
    if CHROMIUM is None:
        missing_tool("chromium is not installed: run `make chromium` (scripts/install-chromium.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()
