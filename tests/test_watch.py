"""`watch`, run as users run it (a subprocess on a free port, the real engine and model), and its
live page in real headless Chromium: cards go stale when a prelude is edited, text streams into
a card before its output file is written, the finished outputs replace it, all without a reload;
a broken input shows its error and the watcher goes on; foreign Hosts and other origins are
refused; Ctrl-C ends it with status 130 and no temp files; each round checks the outputs
against their expectations, and an edit of an expectations file alone checks again and makes
nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cached_prompts.commands.outputs import outputs_test_prompts
from cached_prompts.commands.run_events import RunObserver
from cached_prompts.commands.watch import WatchedKind, watched_kind
from cached_prompts.errors import InputsChangedError
from cached_prompts.workspace.layout import Workspace
from cached_prompts.workspace.records import record_path

from .conftest import CHATML_SYSTEM, GREEDY, PRELUDE, prompt_for, write

OUTPUTS = "test_prompts_outputs"
WAIT_MS = 240_000  # generous: the machine may be busy; no test asserts a duration
URL_LINE = re.compile(r"live report: (http://\S+)")


@dataclass
class Watch:
    process: subprocess.Popen
    url: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it; the exit status."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=WAIT_MS / 1000)


def small_workspace(root: Path) -> Path:
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    write(root / "test_prompts" / "dictionary---river.txt", prompt_for("river"))
    return root


@pytest.fixture
def start_watch(tmp_path: Path) -> Iterator:
    """start_watch(root, *flags) -> Watch; every process it started is stopped after the test."""
    started: list[subprocess.Popen] = []

    def start(root: Path, *flags: str) -> Watch:
        log = tmp_path / f"watch-{len(started)}.log"
        command = [sys.executable, "-m", "cached_prompts", "--root", str(root), "--lp-n-ctx", "1024",
                   "--lp-n-batch", "256", "watch", "--port", "0", *flags]
        with log.open("wb") as handle:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=handle,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        started.append(process)
        deadline = time.monotonic() + WAIT_MS / 1000
        while time.monotonic() < deadline:
            said = log.read_text(encoding="utf-8", errors="replace")
            match = URL_LINE.search(said)
            if match or ("--no-serve" in flags and "watching " in said):
                return Watch(process, match.group(1) if match else "", log)
            assert process.poll() is None, log.read_text(encoding="utf-8", errors="replace")
            time.sleep(0.1)
        raise AssertionError("watch printed no address: " + log.read_text(encoding="utf-8", errors="replace"))

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def chromium_page(browser) -> Iterator:
    """A page in its own browser context (conftest's `browser`), with the errors it logs."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.errors = []  # type: ignore[attr-defined]
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
        yield page
    finally:
        context.close()


def wait_for_file(path: Path, newer_than_ns: int = 0) -> None:
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        try:
            if path.stat().st_mtime_ns > newer_than_ns:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path.name} was not written")


def card_state(page, name: str) -> dict:
    return page.evaluate("""name => {
        const card = [...document.querySelectorAll('.card')].find(c => c.dataset.output === name
                                                                     || c.dataset.missingOutput === name);
        if (!card) return null;
        const pre = card.querySelector('pre.out');
        return {stale: card.dataset.stale, live: card.classList.contains('live'), ref: card.classList.contains('ref'),
                text: pre ? pre.textContent : null};
    }""", name)


def test_the_live_page_follows_an_edit_without_reloading(tmp_path: Path, start_watch, chromium_page) -> None:
    root = small_workspace(tmp_path / "ws")
    outputs = [root / OUTPUTS / f"dictionary---river.output-{k}.txt" for k in (0, 1)]
    watch = start_watch(root, "-n", "2", "--max-tokens", "16")
    for output in outputs:
        wait_for_file(output)
    page = chromium_page
    page.goto(watch.url)
    page.wait_for_function("() => document.getElementById('live-status').textContent.startsWith('up to date')",
                           timeout=WAIT_MS)
    for output in outputs:
        assert card_state(page, output.name)["text"] == output.read_text(encoding="utf-8")
    # What the user set up on the page, and a value that a reload would lose:
    page.evaluate("window.setAtLoad = 'still here'")
    page.fill("#filter", "river")
    page.click(f"[data-output='{outputs[1].name}'] .ref-button")
    page.click(f"[data-output='{outputs[1].name}'] details.rec summary")
    page.evaluate("""() => {  // note when streamed text first shows in output 0's card
        new MutationObserver(() => {
            const live = document.querySelector(".card.live[data-output='dictionary---river.output-0.txt'] pre.live-out");
            if (live && live.textContent && !window.firstText) window.firstText = Date.now();
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")

    written = outputs[0].stat().st_mtime_ns
    prelude = root / "preludes" / "dictionary.txt"
    prelude.write_text(PRELUDE.replace("crisp white", "sweet white"), encoding="utf-8")

    page.wait_for_function(f"() => document.querySelector(\"[data-output='{outputs[0].name}']\").dataset.stale === 'true'",
                           timeout=WAIT_MS)
    page.wait_for_function("() => window.firstText !== undefined", timeout=WAIT_MS)
    for output in outputs:
        wait_for_file(output, newer_than_ns=written)
    # the text was on the page before the new output file existed
    assert page.evaluate("window.firstText") < outputs[0].stat().st_mtime_ns / 1e6
    page.wait_for_function(f"""() => {{
        const card = document.querySelector("[data-output='{outputs[0].name}']");
        return card.dataset.stale === 'false' && !card.classList.contains('live');
    }}""", timeout=WAIT_MS)
    for output in outputs:
        state = card_state(page, output.name)
        assert state["stale"] == "false" and state["text"] == output.read_text(encoding="utf-8")
    assert page.evaluate("window.setAtLoad") == "still here"  # no reload
    assert page.input_value("#filter") == "river"
    assert card_state(page, outputs[1].name)["ref"] is True  # the chosen reference card
    assert page.evaluate(f"document.querySelector(\"[data-output='{outputs[1].name}'] details.rec\").open")
    assert page.errors == []
    assert watch.interrupt() == 130


def test_an_input_made_invalid_shows_its_error_and_watch_goes_on(tmp_path: Path, start_watch, chromium_page) -> None:
    root = small_workspace(tmp_path / "ws")
    river = root / OUTPUTS / "dictionary---river.output-deterministic.txt"
    watch = start_watch(root, "-d", "--max-tokens", "4")
    wait_for_file(river)
    page = chromium_page
    page.goto(watch.url)
    page.wait_for_function("() => document.getElementById('live-status').textContent.startsWith('up to date')",
                           timeout=WAIT_MS)
    page.evaluate("window.setAtLoad = 1")

    broken = root / "test_prompts" / "dictionary---lake.txt"
    broken.write_bytes(b"lake \xff\xfe<|im_end|>\n")
    page.wait_for_function("() => document.querySelector('#skipped') && "
                           "document.querySelector('#skipped').textContent.includes('dictionary---lake.txt')",
                           timeout=WAIT_MS)
    assert "is not UTF-8" in page.text_content("#skipped")
    deadline = time.monotonic() + WAIT_MS / 1000
    while "skipped dictionary---lake.txt" not in watch.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "not UTF-8" in watch.stderr()

    broken.write_text(prompt_for("lake"), encoding="utf-8")  # fixed: the watcher made it
    lake = root / OUTPUTS / "dictionary---lake.output-deterministic.txt"
    wait_for_file(lake)
    page.wait_for_function("() => !document.querySelector('#skipped') && "
                           "document.querySelector(\"[data-output='dictionary---lake.output-deterministic.txt']\")",
                           timeout=WAIT_MS)
    assert page.evaluate("window.setAtLoad") == 1
    assert page.errors == []
    assert watch.process.poll() is None
    assert watch.interrupt() == 130


def test_foreign_hosts_other_origins_and_writes_are_refused(tmp_path: Path, start_watch) -> None:
    root = small_workspace(tmp_path / "ws")
    watch = start_watch(root, "-d", "--max-tokens", "2")
    port = httpx.URL(watch.url).port
    with httpx.Client(timeout=60) as client:
        page = client.get(watch.url)
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "'unsafe-eval'" not in policy and "script-src 'sha256-" in policy
        rebound = client.get(watch.url, headers={"Host": f"attacker.example:{port}"})
        assert rebound.status_code == 403 and "DNS rebinding" in rebound.text
        assert client.get(watch.url, headers={"Host": "127.0.0.1:1"}).status_code == 403
        foreign = client.get(watch.url + "events", headers={"Origin": "http://attacker.example"})
        assert foreign.status_code == 403
        cross_site = client.get(watch.url + "events", headers={"Sec-Fetch-Site": "cross-site"})
        assert cross_site.status_code == 403
        assert client.post(watch.url, content=b"x").status_code == 405
        assert client.put(watch.url + "events", content=b"x").status_code == 405
    assert watch.interrupt() == 130


def test_ctrl_c_while_generating_ends_with_130_and_no_temp_files(tmp_path: Path, start_watch) -> None:
    root = small_workspace(tmp_path / "ws")
    write(root / "prelude_drafts" / "dictionary.txt", CHATML_SYSTEM + "apple<|im_end|>\n<|im_start|>assistant\n")
    watch = start_watch(root, "-n", "2", "--max-tokens", "64", "--no-serve")
    deadline = time.monotonic() + WAIT_MS / 1000
    while "[1/1] prelude_drafts/dictionary.txt" not in watch.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watch.interrupt() == 130
    assert "interrupted" in watch.stderr()
    assert [p for p in root.rglob("*") if p.name.startswith(".tmp-")] == []


def test_only_inputs_sidecars_and_outputs_count_not_editors_scratch_files(tmp_path: Path) -> None:
    root = tmp_path
    assert watched_kind(root, root / "preludes" / "a.txt") == "input"
    assert watched_kind(root, root / "test_prompts" / "a---b.schema.json") == "input"
    assert watched_kind(root, root / "test_prompts_outputs" / "a---b.output-0.txt") == "output"
    assert watched_kind(root, root / "preludes" / "a.expect.toml") is WatchedKind.EXPECTATIONS
    assert watched_kind(root, root / "test_prompts" / "a---b.expect.toml") is WatchedKind.EXPECTATIONS
    for scratch in (".a.txt.swp", "a.txt~", ".#a.txt", "4913", "#a.txt#", ".tmp-x.part", "a.txt.swx"):
        assert watched_kind(root, root / "preludes" / scratch) is None, scratch
    assert watched_kind(root, root / "llm_cache" / "x.txt") is None
    assert watched_kind(root, root / "preludes" / "deeper" / "a.txt") is None
    assert watched_kind(root, root / "report.html") is None


class _EditsWhileMaking(RunObserver):
    """Saves the prompt again while its outputs are being made, as an editor would."""

    def __init__(self, prompt: Path, *, abandon: bool = False) -> None:
        self.prompt, self.heard = prompt, []
        self.abandon_when_inputs_change = abandon

    def generating(self, outputs: list[Path], what: str, budget: int) -> None:
        self.prompt.write_text(prompt_for("ocean"), encoding="utf-8")
        time.sleep(0.01)  # a later modification time than the read
        os.utime(self.prompt)

    def not_written(self, outputs: list[Path], why: str) -> None:
        self.heard.append((outputs, why))


def test_outputs_of_an_input_that_changed_while_they_were_made_are_not_written(tmp_path: Path, make_runner) -> None:
    root = small_workspace(tmp_path / "ws")
    prompt = root / "test_prompts" / "dictionary---river.txt"
    output = root / OUTPUTS / "dictionary---river.output-deterministic.txt"
    backend, workspace = make_runner(None), Workspace(root)
    observer = _EditsWhileMaking(prompt)
    report = outputs_test_prompts(workspace, backend, GREEDY, 1, True, False, observer=observer)
    assert report.changed == [prompt] and report.written == [] and not output.exists()
    assert observer.heard == [([output], "dictionary---river.txt changed meanwhile")]
    again = outputs_test_prompts(workspace, backend, GREEDY, 1, True, False)  # the next round
    assert again.written == [output] and output.is_file()


def read_events(lines: Iterator[str], wanted: str) -> dict:
    """The data of the next `wanted` event on a live channel (its lines)."""
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event == wanted:
            return json.loads(line[len("data: "):])
    raise AssertionError(f"the live channel ended before a {wanted} event")


@pytest.mark.parametrize("api", ["llama", "openai"])
def test_with_a_server_answers_stream_or_show_when_complete(tmp_path: Path, start_watch, llama_servers,
                                                            api: str) -> None:
    """llama-server streams (`stream: true`); through its OpenAI-compatible API each answer comes whole."""
    server = llama_servers(parallel=2)
    root = small_workspace(tmp_path / "ws")
    output = root / OUTPUTS / "dictionary---river.output-deterministic.txt"
    watch = start_watch(root, "--server", server.url, "--server-api", api, "-d", "--max-tokens", "8")
    wait_for_file(output)
    made = output.stat().st_mtime_ns
    with httpx.stream("GET", watch.url + "events", timeout=WAIT_MS / 1000) as events:
        assert events.status_code == 200
        lines = events.iter_lines()
        read_events(lines, "status")  # connected
        (root / "test_prompts" / "dictionary---river.txt").write_text(prompt_for("lake"), encoding="utf-8")
        assert read_events(lines, "started")["outputs"] == [output.name]
        pieces = []
        while True:
            event, data = next_event(lines, {"text", "ended"})
            if event == "ended":
                break
            pieces += data["outputs"]
    assert data["outputs"] == [output.name]
    wait_for_file(output, newer_than_ns=made)
    assert {entry["output"] for entry in pieces} == {output.name}
    assert "".join(entry["text"] for entry in pieces) == output.read_text(encoding="utf-8")
    assert watch.interrupt() == 130


def next_event(lines: Iterator[str], wanted: set[str]) -> tuple[str, dict]:
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event in wanted:
            return event, json.loads(line[len("data: "):])
    raise AssertionError(f"the live channel ended before a {wanted} event")


def test_watch_abandons_outputs_of_an_input_that_changed_at_once(tmp_path: Path, make_runner) -> None:
    root = small_workspace(tmp_path / "ws")
    prompt = root / "test_prompts" / "dictionary---river.txt"
    output = root / OUTPUTS / "dictionary---river.output-deterministic.txt"
    observer = _EditsWhileMaking(prompt, abandon=True)
    with pytest.raises(InputsChangedError, match="dictionary---river.txt changed while its outputs were made"):
        outputs_test_prompts(Workspace(root), make_runner(None), GREEDY, 1, True, False, observer=observer)
    assert not output.exists()
    assert observer.heard == [([output], "dictionary---river.txt changed while its outputs were made")]


PASSING = '[[expect]]\nname = "short"\ntokens = [1, 8]\n[[expect]]\nname = "no marker"\nnot_contains = "§"\n'
FAILING = PASSING + '[[expect]]\nname = "marker"\ncontains = "§"\n'
CHECK_ROW = r"{passed}\s+{rate}\s+\[\d+%, \d+%\]\s+100%\s+{verdict}\s+test_prompts/dictionary---river\.txt"


def round_check(lines: Iterator[str]) -> dict:
    """The check carried by the `refresh` event that ends the next round (those of changed
    files carry none); no output is started before it. The channel's keep-alive lines let
    the deadline be checked while nothing comes."""
    deadline, event = time.monotonic() + WAIT_MS / 1000, ""
    for line in lines:
        assert time.monotonic() < deadline, "no round checked the outputs again"
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: "):])
            assert event != "started", f"an output was made: {data}"
            if event == "refresh" and "check" in data:
                return data["check"]
    raise AssertionError("the live channel ended before a round checked the outputs")


def test_each_round_checks_and_an_edited_expectation_checks_again_making_nothing(tmp_path: Path,
                                                                                 start_watch) -> None:
    root = small_workspace(tmp_path / "ws")
    expectations = write(root / "preludes" / "dictionary.expect.toml", PASSING)
    output = root / OUTPUTS / "dictionary---river.output-deterministic.txt"
    watch = start_watch(root, "-d", "--max-tokens", "8")
    deadline = time.monotonic() + WAIT_MS / 1000
    while not re.search(CHECK_ROW.format(passed="1/1", rate="100%", verdict="ok"), watch.stderr()):
        assert time.monotonic() < deadline and watch.process.poll() is None, watch.stderr()
        time.sleep(0.1)
    made, text = output.stat().st_mtime_ns, output.read_bytes()
    record = record_path(output).read_bytes()
    page = httpx.get(watch.url, timeout=WAIT_MS / 1000).text
    assert 'class="badge check pass"' in page and 'class="badge check fail"' not in page

    with httpx.stream("GET", watch.url + "events", timeout=WAIT_MS / 1000) as events:
        lines = events.iter_lines()
        read_events(lines, "status")  # connected
        expectations.write_text(FAILING, encoding="utf-8")
        check = round_check(lines)
    (river,) = check["prompts"]
    assert (river["input"], river["passed"], river["total"], river["reaches_threshold"]) == \
        ("test_prompts/dictionary---river.txt", 0, 1, False)
    assert river["outputs"] == [{"output": f"{OUTPUTS}/{output.name}", "passed": False, "failed": ["marker"],
                                 "status": "fresh"}]
    assert check["ok"] is False
    assert re.search(CHECK_ROW.format(passed="0/1", rate="0%", verdict="UNDER"), watch.stderr())
    assert "marker (lacks '§')" in watch.stderr()
    page = httpx.get(watch.url, timeout=WAIT_MS / 1000).text
    assert 'class="badge check fail"' in page and 'class="badge check pass"' not in page
    assert (output.stat().st_mtime_ns, output.read_bytes(), record_path(output).read_bytes()) == \
        (made, text, record)  # checked again, never made again
    assert watch.interrupt() == 130
