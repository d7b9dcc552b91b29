"""The HTML report, checked in real headless Chromium (Debian's `chromium`, driven by
Playwright), and the output records (sidecars) it shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cached_prompts.report.page import build_report, json_for_script, write_report
from cached_prompts.workspace.records import OutputRecord, new_run_id, read_record, record_path, write_records
from cached_prompts.workspace.layout import Workspace

from .conftest import age, age_tree, prompt_for, write

PHONE = {"width": 390, "height": 844}


def word_count(text: str, at_start: bool) -> int:
    """A simple, exact token counter for checking the page's arithmetic: words, plus BOS."""
    return len(text.split()) + (1 if at_start else 0)


@dataclass
class View:
    """A report page open in the browser, with what it logged and requested."""

    page: object
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def cards(self) -> dict[str, dict]:
        """Every output card by file name: its prompt, text, stale mark and token count."""
        return {card["name"]: card for card in self.page.eval_on_selector_all(
            "[data-output]", """cards => cards.map(card => ({
                name: card.dataset.output, stale: card.dataset.stale,
                item: card.closest('article.item').dataset.name,
                text: card.querySelector('pre.out') ? card.querySelector('pre.out').textContent : null,
                tokens: card.querySelector('.tokens').textContent,
                ctx: card.querySelector('.ctx') ? card.querySelector('.ctx').title : null}))""")}

    def count(self, name: str) -> int:
        return int(self.page.text_content(f"[data-count='{name}'] b").replace(",", ""))

    def visible_items(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "article.item", "items => items.filter(i => i.offsetParent !== null).map(i => i.dataset.name)")

    def assert_clean(self) -> None:
        assert self.errors == []
        assert self.requests == [self.url]  # the page itself, nothing else


@pytest.fixture
def open_page(browser):
    """open_page(path, **context_options) -> View; the browser context is closed after the test."""
    contexts = []

    def open_(path: Path, **options: object) -> View:
        context = browser.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        view = View(page, path.resolve().as_uri())
        page.on("console", lambda message: view.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: view.errors.append(str(error)))
        page.on("request", lambda request: view.requests.append(request.url))
        page.goto(view.url)
        return view

    yield open_
    for context in contexts:
        context.close()


def report_file(root: Path, **options: object) -> Path:
    workspace = Workspace(root)
    html = build_report(workspace, count_tokens=options.pop("count_tokens", word_count),
                        n_ctx=options.pop("n_ctx", 4096), **options)
    return write_report(workspace, None, html)


def write_outputs(root: Path, stem: str, texts: dict[str, str], folder: str = "test_prompts_outputs") -> list[Path]:
    return [write(root / folder / f"{stem}.output-{key}.txt", text) for key, text in texts.items()]


def record(**changes: object) -> OutputRecord:
    values = dict(model="SmolLM2-135M-Instruct-Q4_1.gguf", model_id="ab" * 32, backend="local",
                  sampling={"temperature": 0.8, "top_k": 40, "max_tokens": 4}, seed=1234,
                  created="2026-11-25T20:00:00Z", run_id="20261125T200000Z-abcdef", generated_tokens=4,
                  seconds=0.5, prelude_tokens=40, prompt_tokens=9, n_ctx=1024)
    return OutputRecord(**{**values, **changes})


# ----- the page for a workspace made by the real CLI ---------------------------------------------


def test_every_output_is_shown_under_its_prompt_with_right_counts(cli, workspace: Path, open_page,
                                                                   make_runner) -> None:
    assert cli(workspace, "outputs-for-drafts", "-n", "2", "--max-tokens", "4")[0] == 0
    assert cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "4")[0] == 0
    write_outputs(workspace, "dictionary---river", {"deterministic": "A flowing body of water."})
    code, out, _ = cli(workspace, "report")
    assert code == 0 and out.strip() == str(workspace / "report.html")
    outputs = sorted([*workspace.glob("prelude_drafts_outputs/*.txt"), *workspace.glob("test_prompts_outputs/*.txt")])
    assert len(outputs) == 2 + 3 * 2 + 1

    view = open_page(workspace / "report.html")
    cards = view.cards()
    counter = make_runner(None)
    assert sorted(cards) == sorted(p.name for p in outputs)
    for path in outputs:
        card = cards[path.name]
        text = path.read_text(encoding="utf-8")
        assert card["item"] == path.name.split(".output-")[0]
        assert card["text"] == text
        assert card["tokens"] == f"{counter.count_tokens(text, at_start=False)} token" + \
            ("" if counter.count_tokens(text, at_start=False) == 1 else "s")
        assert card["stale"] == "false"
    assert view.count("output") == len(outputs)
    assert view.count("test-prompt") == 3 and view.count("draft") == 1 and view.count("prelude") == 2
    assert view.count("stale-output") == 0
    # river has the deterministic output, so the other prompts miss theirs; it comes first
    assert view.count("missing-output") == 2
    river = view.page.eval_on_selector_all("article[data-name='dictionary---river'] .card",
                                           "cards => cards.map(c => c.dataset.output || c.dataset.missingOutput)")
    assert river[0] == "dictionary---river.output-deterministic.txt"
    assert view.page.locator("[data-missing-output='dictionary---library.output-deterministic.txt']").count() == 1
    view.assert_clean()


def test_report_flag_and_config_refresh_the_page(cli, workspace: Path, open_page) -> None:
    page = workspace / "report.html"
    assert cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "4", "--report")[0] == 0
    first = open_page(page)
    assert len(first.cards()) == 3
    data = json.loads(first.page.text_content("#report-data"))
    run = read_record(workspace / "test_prompts_outputs" / "dictionary---river.output-0.txt").run_id
    assert data["run_id"] == run and data["made"]  # the page names the run that made the outputs
    assert run in first.page.text_content("header .facts")

    write(workspace / "cached-prompts.toml", "report = true\n")
    age(page, 100)
    before = page.stat().st_mtime_ns
    assert cli(workspace, "outputs-for-drafts", "-n", "1", "--max-tokens", "4")[0] == 0
    assert page.stat().st_mtime_ns > before
    second = open_page(page)
    assert "dictionary.output-0.txt" in second.cards()
    assert len(second.cards()) == 4
    second.assert_clean()

    other = workspace / "elsewhere" / "page.html"
    code, out, _ = cli(workspace, "report", "-o", str(other))
    assert code == 0 and out.strip() == str(other) and other.is_file()


def test_open_hands_the_page_to_the_web_browser(workspace: Path, tmp_path: Path) -> None:
    opened = tmp_path / "opened.txt"
    # $BROWSER is what Python's webbrowser runs: here a command that notes the URL it gets
    browser = f"{sys.executable} -c \"import sys; open({str(opened)!r}, 'w').write(sys.argv[1])\" %s"
    result = subprocess.run([sys.executable, "-m", "cached_prompts", "--root", str(workspace), "-q",
                             "report", "--open"], env={**os.environ, "BROWSER": browser},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(workspace / "report.html")
    assert opened.read_text(encoding="utf-8") == (workspace / "report.html").as_uri()


# ----- marks, filter, keys, diff (outputs written directly) ------------------------------------------


def test_stale_and_missing_outputs_are_marked(workspace: Path, open_page) -> None:
    write_outputs(workspace, "dictionary---river", {"0": "water", "1": "stream"})
    write_outputs(workspace, "dictionary---library", {"0": "books"})
    write_outputs(workspace, "dictionary-long---umbrella", {"0": "rain", "1": "shade"})
    age_tree(workspace)  # inputs and outputs equally old: all fresh
    age(workspace / "test_prompts_outputs" / "dictionary---river.output-1.txt", 200)  # older than its prompt
    os.utime(workspace / "preludes" / "dictionary-long.txt")  # prelude edited now: its prompt's outputs are stale
    library = workspace / "test_prompts_outputs" / "dictionary---library.output-0.txt"
    write_records([(library, record(model_id="made-by-another-model"))])
    view = open_page(report_file(workspace, model_id="made-by-another-model"))
    stale = {name: card["stale"] for name, card in view.cards().items()}
    assert stale == {"dictionary---river.output-0.txt": "false", "dictionary---river.output-1.txt": "true",
                     "dictionary---library.output-0.txt": "false",
                     "dictionary-long---umbrella.output-0.txt": "true",
                     "dictionary-long---umbrella.output-1.txt": "true"}
    assert view.count("stale-output") == 3
    reason = "name => document.querySelector(`[data-output='${name}'] .badge.stale`).title"
    assert view.page.evaluate(reason, "dictionary---river.output-1.txt") == "older than dictionary---river.txt and dictionary.txt"
    assert view.page.evaluate(reason, "dictionary-long---umbrella.output-0.txt") == \
        "older than dictionary-long.txt"  # the prelude, not the prompt
    view.assert_clean()
    # the commands judge outputs of another model stale (freshness.judge): so does the page
    other = open_page(report_file(workspace, model_id="this-model"))
    assert other.cards()["dictionary---library.output-0.txt"]["stale"] == "true"
    assert other.page.evaluate(reason, "dictionary---library.output-0.txt") == \
        "made by another model (SmolLM2-135M-Instruct-Q4_1.gguf)"
    assert view.count("missing-output") == 2  # library's output 1, the draft's output 0
    assert view.page.locator("article[data-name='dictionary---library'] "
                             "[data-missing-output='dictionary---library.output-1.txt']").count() == 1
    assert view.page.locator("[data-missing-output='dictionary.output-0.txt']").count() == 1
    attention = view.page.eval_on_selector_all("article.item", "items => items.map(i => i.dataset.attention)")
    assert attention == ["true"] * 4
    view.assert_clean()


def test_filter_and_keyboard_navigation(workspace: Path, open_page) -> None:
    write_outputs(workspace, "dictionary---river", {"0": "Water that flows to the sea."})
    write_outputs(workspace, "dictionary---library", {"0": "A room full of books."})
    write_outputs(workspace, "dictionary-long---umbrella", {"0": "It keeps the rain off."})
    view = open_page(report_file(workspace))
    page = view.page
    everything = ["dictionary", "dictionary---library", "dictionary---river", "dictionary-long---umbrella"]
    assert view.visible_items() == everything

    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "filter"
    page.keyboard.type("BOOKS")  # output text, any case
    assert view.visible_items() == ["dictionary---library"]
    assert page.text_content("#shown") == "1 of 4 shown"
    page.fill("#filter", "dictionary-long")  # a prelude's name shows its prompts
    assert view.visible_items() == ["dictionary-long---umbrella"]
    page.fill("#filter", "no such words")
    assert view.visible_items() == [] and page.is_visible("#no-match")
    page.keyboard.press("Escape")
    assert view.visible_items() == everything
    page.check("#only-attention")  # the draft has no outputs: missing
    assert view.visible_items() == ["dictionary"]
    page.uncheck("#only-attention")

    current = "document.querySelector('article.item.current')?.dataset.name"
    page.keyboard.press("j")
    assert page.evaluate(current) == "dictionary"
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert page.evaluate(current) == "dictionary---river"
    page.keyboard.press("k")
    assert page.evaluate(current) == "dictionary---library"
    view.assert_clean()


def test_word_differences_are_highlighted_against_a_chosen_output(workspace: Path, open_page) -> None:
    write_outputs(workspace, "dictionary---river", {"deterministic": "The cat sat on the mat.",
                                                    "0": "The dog sat on the mat.", "1": "The cat sat on the mat."})
    view = open_page(report_file(workspace))
    marks = ("name => [...document.querySelector(`[data-output='${name}'] pre.out`).querySelectorAll('mark.d')]"
             ".map(m => m.textContent)")
    names = [f"dictionary---river.output-{k}.txt" for k in ("deterministic", "0", "1")]
    assert [view.page.evaluate(marks, n) for n in names] == [[], ["dog"], []]
    view.page.click(f"[data-output='{names[1]}'] .ref-button")
    assert [view.page.evaluate(marks, n) for n in names] == [["cat"], [], ["cat"]]
    assert view.cards()[names[1]]["text"] == "The dog sat on the mat."  # highlighting keeps the text
    view.assert_clean()


# ----- safety -------------------------------------------------------------------------------------


def test_workspace_text_is_shown_never_run(workspace: Path, open_page) -> None:
    script = "<script>window.pwned=1</script>"
    write(workspace / "test_prompts" / "dictionary---xss.txt", f"{script}\n" + prompt_for("x"))
    name = "dictionary---<img src=x onerror=window.pwned2=1>"
    write(workspace / "test_prompts" / f"{name}.txt", prompt_for("y"))
    write_outputs(workspace, "dictionary---xss", {"0": "</pre><script>window.pwned3=1</script>&amp;"})
    write_outputs(workspace, name, {"0": "<b>bold?</b>"})
    view = open_page(report_file(workspace, run_id="</script><script>window.pwned4=1</script>"))
    page = view.page
    assert page.evaluate("[window.pwned, window.pwned2, window.pwned3, window.pwned4]") == [None] * 4
    assert script in page.text_content("article[data-name='dictionary---xss'] details.source pre")
    cards = view.cards()
    assert cards["dictionary---xss.output-0.txt"]["text"] == "</pre><script>window.pwned3=1</script>&amp;"
    assert cards[f"{name}.output-0.txt"]["text"] == "<b>bold?</b>"
    assert page.locator("main script, main img, main b").count() == 0
    data = json.loads(page.text_content("#report-data"))
    assert data["run_id"] == "</script><script>window.pwned4=1</script>"
    view.assert_clean()  # the <img src=x> would have been a request


def test_json_for_script_cannot_close_the_script() -> None:
    text = json_for_script({"a": "</script><!-- & >"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"a": "</script><!-- & >"}


# ----- skipped inputs ------------------------------------------------------------------------------


def test_skipped_inputs_are_listed_with_their_reason(workspace: Path, open_page) -> None:
    write(workspace / "test_prompts" / "no-separator.txt", "hello")
    write(workspace / "test_prompts" / "missing---x.txt", "hello")
    (workspace / "test_prompts" / "dictionary---latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    write(workspace / "test_prompts" / "dictionary---long.txt", "word " * 60)
    html = build_report(Workspace(workspace), count_tokens=word_count, n_ctx=80,
                        skipped=[(Path("test_prompts/dictionary---river.txt"), "the run failed it"),
                                 (workspace / "test_prompts" / "gone.txt", "vanished meanwhile")])
    page_file = write_report(Workspace(workspace), Path("r.html"), html)
    view = open_page(page_file)
    reasons = view.page.eval_on_selector_all("#skipped li", "items => items.map(i => i.textContent)")
    joined = "\n".join(reasons)
    assert "test_prompts/no-separator.txt no-separator.txt: a test prompt's name must be PRELUDE---ID.txt" in joined
    assert "its prelude preludes/missing.txt does not exist" in joined
    assert "test_prompts/dictionary---latin1.txt is not UTF-8 text (bad byte at offset 3)" in joined
    assert "tokens, the context only 80" in joined and "dictionary---long" in joined
    assert "test_prompts/dictionary---river.txt the run failed it" in joined
    assert "test_prompts/gone.txt vanished meanwhile" in joined
    assert view.count("skipped-input") == len(reasons) == 6
    skip = "name => document.querySelector(`article[data-name='${name}'] .skip`)?.textContent"
    assert "the run failed it" in view.page.evaluate(skip, "dictionary---river")
    view.assert_clean()


def test_prompt_tokens_are_counted_as_the_model_sees_them_after_the_prelude(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / "preludes" / "p.txt", "alpha beta")  # ends mid-word: the prompt's first word joins it
    write(root / "test_prompts" / "p---x.txt", "gamma delta")
    html = build_report(Workspace(root), count_tokens=word_count, n_ctx=100)
    assert "prelude text · 3 tokens<" in html
    assert "prompt · 1 token<" in html  # "alpha betagamma delta" + BOS = 4, minus the prelude's 3


# ----- output records (sidecars) ----------------------------------------------------------------------


def test_records_round_trip_and_show_on_the_page(workspace: Path, open_page) -> None:
    paths = write_outputs(workspace, "dictionary---river", {"deterministic": "A stream.", "0": "Water."})
    greedy = record(seed=None, sampling={"temperature": 0.0})
    sampled = record(model="other.gguf")
    write_records([(paths[0], greedy), (paths[1], sampled)])
    assert record_path(paths[0]).name == "dictionary---river.output-deterministic.json"
    assert replace(read_record(paths[0]), output_sha256="") == greedy
    assert read_record(paths[1]).model == "other.gguf"
    assert read_record(paths[1]).tokens_per_second == 8.0

    view = open_page(report_file(workspace, run_id=new_run_id()))
    card = view.page.locator("[data-output='dictionary---river.output-0.txt']")
    summary = card.locator("details.rec summary").text_content()
    assert summary == "other.gguf · seed 1234 · 8.0 tok/s"
    assert "temp 0.8 · top-k 40 · max 4" in card.locator("details.rec").text_content()
    assert view.cards()["dictionary---river.output-0.txt"]["ctx"] == \
        "prelude 40 + prompt 9 + output 4 = 53 of 1,024"  # the record's counts, not the counter's
    view.assert_clean()


def test_a_record_is_ignored_when_it_does_not_describe_the_output(tmp_path: Path) -> None:
    output = write(tmp_path / "A---x.output-0.txt", "first text")
    write_records([(output, record())])
    assert read_record(output) is not None
    output.write_text("edited by hand", encoding="utf-8")
    assert read_record(output) is None  # describes the old text
    sidecar = record_path(output)
    for bad in [b"{", b"[]", json.dumps({"format": 1}).encode(), b"\xff",
                json.dumps({"format": 1, **{**record().__dict__, "seed": True}}).encode(),
                json.dumps({"format": 1, **{**record().__dict__, "output_sha256": ""}}).encode() + b" " * 70000]:
        sidecar.write_bytes(bad)
        assert read_record(output) is None
    assert read_record(tmp_path / "none.output-0.txt") is None


def test_records_never_follow_symlinks(tmp_path: Path) -> None:
    output = write(tmp_path / "A---x.output-0.txt", "text")
    write_records([(output, record())])
    target = tmp_path / "elsewhere.json"
    record_path(output).rename(target)  # a valid record, reached only through a link
    record_path(output).symlink_to(target)
    assert read_record(output) is None  # a linked sidecar is not read
    before = target.read_bytes()
    write_records([(output, record(model="new"))])
    assert target.read_bytes() == before  # the link was replaced, its target left alone
    assert not record_path(output).is_symlink() and read_record(output) is not None


# ----- looks ---------------------------------------------------------------------------------------


def test_dark_light_and_phone_width(workspace: Path, open_page) -> None:
    write_outputs(workspace, "dictionary---river", {"0": "word " * 200, "1": "x" * 3000})
    path = report_file(workspace)
    background = "getComputedStyle(document.body).backgroundColor"
    light = open_page(path, color_scheme="light").page.evaluate(background)
    dark = open_page(path, color_scheme="dark").page.evaluate(background)
    assert light == "rgb(245, 246, 248)" and dark == "rgb(19, 21, 25)"
    phone = open_page(path, viewport=PHONE)
    width = phone.page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1]  # nothing wider than a phone screen
    phone.assert_clean()
