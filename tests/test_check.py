"""`check`: outputs the test writes itself (known pass rates) against expectations; stale and
missing outputs; exit codes; bad files; `outputs-test-prompts --check` on the real model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import PRELUDE, age_tree, prompt_for, write

OUT = "test_prompts_outputs"
GOOD = "A wide stream of water."
BAD = "Rivers:\n- long\n- wet"


@pytest.fixture
def checked(tmp_path: Path) -> Path:
    """river: 3 of 5 outputs pass (needs 0.6); library: 4 of 4 present pass, output 4 missing."""
    root = tmp_path / "ws"
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    write(root / "test_prompts" / "dictionary---river.txt", prompt_for("river"))
    write(root / "test_prompts" / "dictionary---library.txt", prompt_for("library"))
    write(root / "preludes" / "dictionary.expect.toml",
          '[[expect]]\nname = "one line"\nlines = 1\n[[expect]]\nstarts_with = "A"\n')
    write(root / "test_prompts" / "dictionary---river.expect.toml", "threshold = 0.6\n")
    age_tree(root)
    for k, text in enumerate([GOOD, GOOD, BAD, GOOD, "The water."]):
        write(root / OUT / f"dictionary---river.output-{k}.txt", text)
    for k in range(4):
        write(root / OUT / f"dictionary---library.output-{k}.txt", "A building with books.")
    return root


def check_json(cli, root: Path) -> tuple[int, dict]:
    code, out, err = cli(root, "check", "--json")
    assert "Traceback" not in err
    return code, json.loads(out)


def test_known_pass_rates_with_their_intervals(cli, checked: Path) -> None:
    code, result = check_json(cli, checked)
    assert code == 1  # library: output 4 is missing, so 4 of 5 is under its threshold 1.0
    library, river = result["prompts"]
    assert (river["input"], river["passed"], river["total"], river["rate"], river["threshold"]) == \
        ("test_prompts/dictionary---river.txt", 3, 5, 0.6, 0.6)
    assert river["interval"] == pytest.approx([0.2307, 0.8824], abs=1e-4)
    assert [(o["output"], o["passed"], o["failed"]) for o in river["outputs"]] == [
        ("test_prompts_outputs/dictionary---river.output-0.txt", True, []),
        ("test_prompts_outputs/dictionary---river.output-1.txt", True, []),
        ("test_prompts_outputs/dictionary---river.output-2.txt", False, ["one line", 'starts_with "A"']),
        ("test_prompts_outputs/dictionary---river.output-3.txt", True, []),
        ("test_prompts_outputs/dictionary---river.output-4.txt", False, ['starts_with "A"'])]
    assert river["reaches_threshold"] is True
    assert (library["passed"], library["total"], library["reaches_threshold"]) == (4, 5, False)
    assert library["outputs"][4] == {"output": "test_prompts_outputs/dictionary---library.output-4.txt",
                                     "passed": False, "failed": [], "status": "missing", "why": "missing"}
    assert result["preludes"] == [{"prelude": "preludes/dictionary.txt", "passed": 7, "total": 10, "rate": 0.7,
                                   "interval": pytest.approx([0.3968, 0.8922], abs=1e-4)}]
    assert result["drafts"] == [] and result["skipped"] == [] and result["ok"] is False
    write(checked / OUT / "dictionary---library.output-4.txt", "A place to read.")
    code, result = check_json(cli, checked)
    assert code == 0 and result["ok"] is True


def test_stale_outputs_are_said_and_not_counted_as_passes(cli, checked: Path) -> None:
    write(checked / OUT / "dictionary---library.output-4.txt", "A place to read.")
    prelude = checked / "preludes" / "dictionary.txt"
    prelude.write_text(PRELUDE + " ", encoding="utf-8")
    later = (checked / OUT / "dictionary---river.output-0.txt").stat().st_mtime_ns + 10**9
    os.utime(prelude, ns=(later, later))
    code, result = check_json(cli, checked)
    assert code == 1
    assert all(not o["passed"] and o["status"] == "stale" for p in result["prompts"] for o in p["outputs"])
    assert result["prompts"][1]["outputs"][0]["why"] == "older than dictionary.txt"
    assert result["prompts"][1]["outputs"][2]["failed"] == ["one line", 'starts_with "A"']  # still said
    code, out, _ = cli(checked, "check")
    assert "dictionary---river.output-0.txt: stale: older than dictionary.txt" in out


def test_the_table(cli, checked: Path) -> None:
    code, out, err = cli(checked, "check")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "test prompts:"
    assert any(line.split() == ["3/5", "60%", "[23%,", "88%]", "60%", "ok", "test_prompts/dictionary---river.txt"]
               for line in lines)
    assert any(line.split() == ["4/5", "80%", "[38%,", "96%]", "100%", "UNDER",
                                "test_prompts/dictionary---library.txt"] for line in lines)
    assert any(line.strip() == 'dictionary---river.output-2.txt: one line (3 non-empty lines); '
               'starts_with "A" (starts otherwise)' for line in lines)
    assert any(line.split() == ["7/10", "70%", "[40%,", "89%]", "preludes/dictionary.txt"] for line in lines)
    assert "test_prompts/dictionary---library.txt: 4 of 5 outputs passed, under its threshold 1" in err


@pytest.mark.parametrize("toml,key", [
    ("[[expect]]\nregex = \"[unclosed\"\n", "expect[0].regex"),
    ("[[expect]]\nstarts = \"A\"\n", "expect[0].starts"),
    ("[[expect]\n", "not valid TOML"),
])
def test_a_bad_file_skips_its_input_with_one_line(cli, checked: Path, toml: str, key: str) -> None:
    write(checked / OUT / "dictionary---library.output-4.txt", "A place to read.")
    write(checked / "test_prompts" / "dictionary---river.expect.toml", toml)
    code, out, err = cli(checked, "check", "--json")
    assert code == 1 and "Traceback" not in err
    result = json.loads(out)
    assert [p["input"] for p in result["prompts"]] == ["test_prompts/dictionary---library.txt"]
    (skipped,) = result["skipped"]
    assert skipped["input"] == "test_prompts/dictionary---river.txt"
    assert skipped["why"].startswith("test_prompts/dictionary---river.expect.toml") and key in skipped["why"]
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and key in error_lines[0]


def test_a_draft_is_checked_like_a_prompt(cli, checked: Path) -> None:
    write(checked / "prelude_drafts" / "d.txt", "user\nhello\nbot\n")
    write(checked / "prelude_drafts" / "d.expect.toml", '[[expect]]\nicontains = "hello"\n')
    age_tree(checked / "prelude_drafts")
    write(checked / "prelude_drafts_outputs" / "d.output-0.txt", "Hello!")
    write(checked / "prelude_drafts_outputs" / "d.output-1.txt", "Bye.")
    _, result = check_json(cli, checked)
    (draft,) = result["drafts"]
    assert (draft["input"], draft["passed"], draft["total"]) == ("prelude_drafts/d.txt", 1, 2)
    assert draft["outputs"][1]["failed"] == ['icontains "hello"']


def test_outputs_test_prompts_check_gates_on_the_real_outputs(cli, workspace: Path) -> None:
    write(workspace / "preludes" / "dictionary.expect.toml", "[[expect]]\nfinished = true\n")
    code, out, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2", "--check")
    assert code == 1, err  # cut by --max-tokens: not finished
    assert "UNDER" in out and "finished (ended by max-tokens)" in out
    code, out, err = cli(workspace, "outputs-test-prompts", "-d", "-f", "--max-tokens", "64",
                         "--stop", "<|im_end|>", "--check")
    assert code == 0, out + err
    assert "1/1" in out and "UNDER" not in out
    code, _, err = cli(workspace, "check", "--max-tokens", "64", "--stop", "<|im_end|>")
    assert code == 0, err
    code, out, _ = cli(workspace, "check")  # other options than the outputs were made with: stale
    assert code == 1 and "stale: made with other options" in out


# ----- the report shows it (real headless Chromium, as tests/test_report.py) ----------------------

from .test_report import open_page, report_file  # noqa: E402,F401  (fixture and helper; browser is in conftest)


def test_the_report_marks_each_output_and_filters_the_failing(checked: Path, open_page) -> None:
    write(checked / "test_prompts" / "dictionary---sea.txt", prompt_for("sea"))
    age_tree(checked / "test_prompts")
    for k in range(5):
        write(checked / OUT / f"dictionary---sea.output-{k}.txt", "A lot of salt water.")
    view = open_page(report_file(checked))
    page = view.page
    marks = {card["name"]: card for card in page.eval_on_selector_all("[data-output]", """cards => cards.map(c => ({
        name: c.dataset.output, mark: c.querySelector('.badge.check')?.textContent,
        why: c.querySelector('.badge.check')?.title}))""")}
    assert marks["dictionary---river.output-0.txt"]["mark"] == "pass"
    assert marks["dictionary---river.output-2.txt"] == {
        "name": "dictionary---river.output-2.txt", "mark": "fail",
        "why": 'one line (3 non-empty lines); starts_with "A" (starts otherwise)'}
    rates = dict(page.eval_on_selector_all("article.item", """items => items.map(i => [i.dataset.name,
        i.querySelector('h3 .rate') ? i.querySelector('h3 .rate').textContent : null])"""))
    assert rates["dictionary---river"] == "3/5 passed · 60% [23%, 88%] · needs 60%"
    assert rates["dictionary---library"] == "4/5 passed · 80% [38%, 96%] · needs 100%"
    assert rates["dictionary---sea"] == "5/5 passed · 100% [57%, 100%] · needs 100%"
    assert page.get_attribute("article[data-name='dictionary---library'] h3 .rate", "class") == "rate under"
    assert page.text_content("section[data-group='dictionary'] h2 .rate") == "12/15 passed · 80% [55%, 93%]"
    assert view.visible_items() == ["dictionary---library", "dictionary---river", "dictionary---sea"]
    page.check("#only-failing")
    assert view.visible_items() == ["dictionary---library", "dictionary---river"]
    assert page.text_content("#shown") == "2 of 3 shown"
    page.uncheck("#only-failing")
    assert len(view.visible_items()) == 3
    view.assert_clean()
