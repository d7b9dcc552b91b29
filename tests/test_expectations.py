"""Expectations (NAME.expect.toml) and checking answers against them; Wilson intervals;
the stop reason each output's record keeps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cached_prompts.backend.interface import StopReason
from cached_prompts.method.checking import Answer, Rate, failures, wilson_interval
from cached_prompts.method.expectations import ExpectationError, for_draft, for_test_prompt
from cached_prompts.workspace.layout import Workspace
from cached_prompts.workspace.records import read_record

from .conftest import write


def expectations_of(tmp_path: Path, toml: str, prelude_toml: str | None = None):
    root = tmp_path / "ws"
    prompt = write(root / "test_prompts" / "p---x.txt", "q")
    write(root / "test_prompts" / "p---x.expect.toml", toml)
    if prelude_toml is not None:
        write(root / "preludes" / "p.expect.toml", prelude_toml)
    return for_test_prompt(Workspace(root), prompt, "p")


def failed(tmp_path: Path, toml: str, text: str, **record: object) -> list[str]:
    return [f.name for f in failures(expectations_of(tmp_path, toml), Answer(text, **record))]


# (check as TOML, an answer that passes, an answer that fails)
CASES = [
    ('equals = "A fruit."', "A fruit.", "A fruit. "),
    ('starts_with = "A "', "A fruit.", "The fruit."),
    ('contains = "fruit"', "A round fruit.", "A round thing."),
    ('contains = ["round", "fruit"]', "A round fruit.", "A fruit."),
    ('contains_any = ["fruit", "berry"]', "A berry.", "A nut."),
    ('not_contains = ["sorry", "As an AI"]', "A fruit.", "As an AI I cannot."),
    ('icontains = "FRUIT"', "A fruit.", "A nut."),
    ('regex = "^A [a-z]+ fruit\\\\.$"', "A round fruit.", "A fruit."),
    ('not_regex = "(?i)\\\\bsorry\\\\b"', "A fruit.", "I am SORRY."),
    ("lines = 2", "one\n\ntwo\n", "one\ntwo\nthree"),
    ("lines = [1, 2]", "one", "one\ntwo\nthree"),
    ("items = 3", "Points:\n1. a\n2) b\n- c\n", "1. a\n2. b"),
    ("items = [2, 6]", "* a\n+ b\n• c", "1. a\nnot an item\n-no space"),
    ('is_json = true', ' {"a": [1, 2]}\n', "{'a': 1}"),
    ('is_json = false', "plain words", "[1]"),
    ('json_schema = {type = "object", required = ["word"], properties = {word = {type = "string"}}}',
     '{"word": "apple"}', '{"word": 3}'),
]


@pytest.mark.parametrize("check,good,bad", CASES, ids=[c[0].split(" ")[0] for c in CASES])
def test_every_check_passes_and_fails_where_it_should(tmp_path: Path, check: str, good: str, bad: str) -> None:
    toml = f"[[expect]]\n{check}\n"
    assert failed(tmp_path, toml, good) == []
    assert len(failed(tmp_path, toml, bad)) == 1


def test_tokens_and_finished_read_the_record(tmp_path: Path) -> None:
    toml = "[[expect]]\ntokens = [2, 10]\n[[expect]]\nfinished = true\n"
    assert failed(tmp_path, toml, "x", tokens=5, stop_reason=StopReason.END_TOKEN) == []
    assert failed(tmp_path, toml, "x", tokens=5, stop_reason=StopReason.STOP_STRING) == []
    assert failed(tmp_path, toml, "x", tokens=11, stop_reason=StopReason.MAX_TOKENS) == ["tokens [2, 10]", "finished"]
    # no record: both fail, saying why
    found = failures(expectations_of(tmp_path, toml), Answer("x"))
    assert [f.why for f in found] == ["no record of its token count", "no record of how it ended"]


def test_a_schema_file_next_to_the_expectations(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / "test_prompts" / "word.schema.json", json.dumps({"type": "array", "maxItems": 2}))
    toml = '[[expect]]\nname = "short list"\njson_schema = "word.schema.json"\n'
    assert failed(tmp_path, toml, "[1, 2]") == []
    assert failed(tmp_path, toml, "[1, 2, 3]") == ["short list"]
    assert failed(tmp_path, toml, "not json") == ["short list"]


def test_a_backtracking_regex_fails_its_check_instead_of_hanging(tmp_path: Path) -> None:
    toml = '[[expect]]\nregex = "^(a|aa)+$"\n'  # exponential on "aaa...b"
    found = failures(expectations_of(tmp_path, toml), Answer("a" * 60 + "b"))
    assert [f.why for f in found] == ["the match took over 1 s"]


def test_a_prompts_file_adds_to_replaces_by_name_or_replaces_the_preludes(tmp_path: Path) -> None:
    prelude = 'threshold = 0.5\n[[expect]]\nname = "short"\nlines = 1\n[[expect]]\ncontains = "A"\n'
    added = expectations_of(tmp_path, '[[expect]]\nstarts_with = "A"\n', prelude)
    assert [c.name for c in added.checks] == ["short", 'contains "A"', 'starts_with "A"']
    assert added.threshold == 0.5
    assert added.files == ("preludes/p.expect.toml", "test_prompts/p---x.expect.toml")
    by_name = expectations_of(tmp_path, 'threshold = 0.8\n[[expect]]\nname = "short"\nlines = [1, 3]\n', prelude)
    assert [(c.name, c.value) for c in by_name.checks] == [("short", (1, 3)), ('contains "A"', ("A",))]
    assert by_name.threshold == 0.8
    replaced = expectations_of(tmp_path, 'replace = true\n[[expect]]\nequals = "B"\n', prelude)
    assert [c.name for c in replaced.checks] == ['equals "B"']
    assert replaced.threshold == 0.5


def test_no_file_means_no_expectations(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    draft = write(root / "prelude_drafts" / "d.txt", "x")
    assert for_draft(Workspace(root), draft) is None
    write(root / "prelude_drafts" / "d.expect.toml", "[[expect]]\nfinished = true\n")
    assert [c.name for c in for_draft(Workspace(root), draft).checks] == ["finished"]


BAD = [
    ("not toml [", "is not valid TOML"),
    ("[[expect]]\nfuzzy = 1\n", "expect[0].fuzzy: unknown check"),
    ("[[expect]]\ncontains = 3\n", "expect[0].contains: must be a non-empty string or a list"),
    ("[[expect]]\nlines = [3, 1]\n", "expect[0].lines: must be a count"),
    ("[[expect]]\nlines = true\n", "expect[0].lines: must be a count"),
    ("[[expect]]\nfinished = 1\n", "expect[0].finished: must be true or false"),
    ("[[expect]]\nregex = \"(unclosed\"\n", "expect[0].regex: the regular expression '(unclosed' does not compile"),
    ("[[expect]]\njson_schema = {type = \"no-such-type\"}\n", "expect[0].json_schema: not a valid JSON schema"),
    ("[[expect]]\njson_schema = \"missing.json\"\n", "expect[0].json_schema: cannot read the schema missing.json"),
    ("[[expect]]\njson_schema = \"../x.json\"\n", "expect[0].json_schema: '../x.json' must be a path inside"),
    ("[[expect]]\njson_schema = {\"$ref\" = \"https://example.com/s.json\"}\n", "points outside the schema"),
    ("[[expect]]\ncontains = \"a\"\nequals = \"b\"\n", "expect[0]: has 2 checks (contains, equals)"),
    ("[[expect]]\nname = \"\"\nequals = \"b\"\n", "expect[0].name: must be a non-empty string"),
    ("[[expect]]\nequals = \"a\"\n[[expect]]\nequals = \"a\"\n", "expect[1].name: 'equals \"a\"' is used twice"),
    ("threshold = 2\n", "threshold must be a number from 0 to 1"),
    ("thresold = 0.5\n", "unknown key 'thresold'"),
    ("expect = 3\n", "expect must be a list of tables"),
]


@pytest.mark.parametrize("toml,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_file_is_one_clear_error_naming_the_file_and_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ExpectationError) as caught:
        expectations_of(tmp_path, toml)
    text = str(caught.value)
    assert text.startswith("test_prompts/p---x.expect.toml")
    assert message in text
    assert "\n" not in text


def test_an_expectations_link_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    prompt = write(root / "test_prompts" / "p---x.txt", "q")
    target = write(tmp_path / "elsewhere.toml", "[[expect]]\nequals = \"a\"\n")
    (root / "test_prompts" / "p---x.expect.toml").symlink_to(target)
    with pytest.raises(ExpectationError, match="is a symbolic link, not a file"):
        for_test_prompt(Workspace(root), prompt, "p")


# ----- Wilson intervals -------------------------------------------------------------------------

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I,
# method 3 (Wilson, no continuity correction), and the usual small-n values.
@pytest.mark.parametrize("passed,total,low,high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (0, 5, 0.0, 0.4345),
    (5, 5, 0.5655, 1.0),
    (0, 0, 0.0, 1.0),
])
def test_wilson_intervals_against_known_values(passed: int, total: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(passed, total)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_rates_reach_thresholds_and_overlap() -> None:
    assert Rate(4, 5).reaches(0.8) and not Rate(3, 5).reaches(0.8) and not Rate(0, 0).reaches(0.0)
    assert Rate(5, 5).overlaps(Rate(3, 5)) and not Rate(20, 20).overlaps(Rate(2, 20))


# ----- the stop reason in each output's record ------------------------------------------------------

def test_each_outputs_record_says_how_it_ended(cli, workspace: Path) -> None:
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2")
    assert code == 0, err
    reasons = {read_record(p).stop_reason for p in (workspace / "test_prompts_outputs").glob("*.txt")}
    assert reasons == {StopReason.MAX_TOKENS}
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "-f", "--max-tokens", "64",
                       "--stop", "<|im_end|>")
    assert code == 0, err
    records = [read_record(p) for p in (workspace / "test_prompts_outputs").glob("*.txt")]
    assert {r.stop_reason for r in records} <= {StopReason.STOP_STRING, StopReason.END_TOKEN}
    assert all(r.generated_tokens < 64 for r in records)
