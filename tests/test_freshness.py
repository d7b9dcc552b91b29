"""Freshness of outputs (workspace/outputs.py): the recipe (sampling options, max tokens, stop
strings, grammar, draft mode) joins time and model, old records without a recipe stay fresh, and what is
in place of an output that could never be written. On the real model, answers of 3 tokens."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cached_prompts.fs import locks
from cached_prompts.fs.files import TEMP_PREFIX, TEMP_SUFFIX
from cached_prompts.options import SamplingOptions
from cached_prompts.report.data import OutputState, collect
from cached_prompts.workspace.layout import DRAFTS_OUTPUTS, TEST_PROMPTS_OUTPUTS, Workspace, remove_stale_output_temp_files
from cached_prompts.workspace.outputs import OutputSet, StaleReason
from cached_prompts.workspace.recipe import Grammar, Recipe
from cached_prompts.workspace.records import read_record, record_path

from .conftest import age_tree, write

N2 = ("-n", "2", "--max-tokens", "3")


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.txt"))}


def changed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(name for name in after if after[name] != before.get(name))


def made(cli, workspace: Path, *args: str) -> tuple[dict[str, int], dict[str, int], str]:
    """Age the workspace, run outputs-test-prompts (it must succeed): (before, after, stderr)."""
    age_tree(workspace)
    before = mtimes(workspace / TEST_PROMPTS_OUTPUTS)
    code, out, err = cli(workspace, "outputs-test-prompts", *args)
    assert code == 0 and out == "", err
    return before, mtimes(workspace / TEST_PROMPTS_OUTPUTS), err


def test_other_sampling_options_make_the_outputs_again_and_say_which_changed(cli, workspace: Path) -> None:
    code, _, _ = cli(workspace, "outputs-test-prompts", *N2)
    assert code == 0
    before, after, err = made(cli, workspace, *N2)
    assert changed(before, after) == [] and "other options" not in err

    before, after, err = made(cli, workspace, *N2, "--lp-temp", "1.5")
    assert changed(before, after) == sorted(after) and len(after) == 6
    assert "were made with other options (temperature 0.8 → 1.5): they are made again" in err
    assert read_record(workspace / TEST_PROMPTS_OUTPUTS / "dictionary---river.output-0.txt").recipe[
        "options"]["temperature"] == 1.5

    before, after, err = made(cli, workspace, *N2, "--lp-temp", "1.5", "--seed", "7")
    assert changed(before, after) == sorted(after)
    assert "(seed 0 → 7)" in err and "temperature" not in err

    before, after, err = made(cli, workspace, *N2, "--lp-temp", "1.5", "--seed", "7")
    assert changed(before, after) == [] and "3 up to date" in err


def test_greedy_outputs_ignore_the_seed_and_temperature_but_not_max_tokens_or_stop(cli, workspace: Path) -> None:
    code, _, _ = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "3")
    assert code == 0
    before, after, err = made(cli, workspace, "-d", "--max-tokens", "3", "--seed", "7", "--lp-temp", "1.5")
    assert changed(before, after) == [] and "3 up to date" in err
    before, after, err = made(cli, workspace, "-d", "--max-tokens", "4")
    assert len(changed(before, after)) == 3 and "(max_tokens 3 → 4)" in err
    before, after, err = made(cli, workspace, "-d", "--max-tokens", "4", "--stop", "\n")
    assert len(changed(before, after)) == 3 and '(stop [] → ["\\n"])' in err


def test_another_draft_mode_makes_the_outputs_again_and_says_draft(cli, workspace: Path) -> None:
    """docs/drafts.md: an output made with --draft off is not the one --draft auto makes."""
    code, _, _ = cli(workspace, "outputs-test-prompts", *N2, "--draft", "off")
    assert code == 0
    river = workspace / TEST_PROMPTS_OUTPUTS / "dictionary---river.output-0.txt"
    assert read_record(river).recipe["draft"] == "off"
    before, after, err = made(cli, workspace, *N2, "--draft", "auto")
    assert changed(before, after) == sorted(after) and len(after) == 6
    assert "were made with other options (draft off → auto): they are made again" in err
    assert read_record(river).recipe["draft"] == "auto"
    before, after, err = made(cli, workspace, *N2)  # auto is the default
    assert changed(before, after) == [] and "3 up to date" in err and "other options" not in err


def test_outputs_of_records_without_a_recipe_stay_fresh(cli, workspace: Path) -> None:
    """Records written before recipes were kept: judged by time and model only."""
    code, _, _ = cli(workspace, "outputs-test-prompts", *N2)
    assert code == 0
    for output in (workspace / TEST_PROMPTS_OUTPUTS).glob("*.txt"):
        values = json.loads(record_path(output).read_text("utf-8"))
        del values["recipe"]
        record_path(output).write_text(json.dumps(values), "utf-8")
        assert read_record(output) is not None and read_record(output).recipe is None
    before, after, err = made(cli, workspace, *N2, "--lp-temp", "1.5")
    assert changed(before, after) == [] and "3 up to date" in err and "other options" not in err
    # a changed input still makes them again, and then their recipe is kept
    (workspace / "test_prompts" / "dictionary---river.txt").touch()
    before, after, err = made(cli, workspace, *N2, "--lp-temp", "1.5")
    assert changed(before, after) == ["dictionary---river.output-0.txt", "dictionary---river.output-1.txt"]
    assert read_record(workspace / TEST_PROMPTS_OUTPUTS / "dictionary---river.output-0.txt").recipe is not None


def test_a_removed_grammar_sidecar_makes_the_outputs_again(cli, workspace: Path) -> None:
    sidecar = write(workspace / "test_prompts" / "dictionary---river.gbnf", 'root ::= "yes" | "no"')
    code, _, _ = cli(workspace, "outputs-test-prompts", *N2)
    assert code == 0
    recipe = Recipe.from_json(read_record(workspace / TEST_PROMPTS_OUTPUTS / "dictionary---river.output-0.txt").recipe)
    assert recipe is not None and recipe.grammar == Grammar.of_sidecar(sidecar)
    sidecar.unlink()  # no file is newer: only the recipe can tell
    before, after, err = made(cli, workspace, *N2)
    assert changed(before, after) == ["dictionary---river.output-0.txt", "dictionary---river.output-1.txt"]
    assert re.search(r"\(grammar dictionary---river\.gbnf \(SHA-256 [0-9a-f]{12}\) → none\)", err)


def test_the_report_judges_the_recipe_as_the_commands_do(cli, workspace: Path) -> None:
    code, _, _ = cli(workspace, "outputs-test-prompts", *N2)
    assert code == 0
    same = collect(Workspace(workspace), count_tokens=None, n_ctx=None, sampling=SamplingOptions(max_tokens=3))
    assert same.count(OutputState.STALE) == 0 and same.count(OutputState.FRESH) == 6
    hotter = collect(Workspace(workspace), count_tokens=None, n_ctx=None,
                     sampling=SamplingOptions(max_tokens=3, temperature=1.5))
    assert hotter.count(OutputState.STALE) == 6 and hotter.count(OutputState.MISSING) == 1  # the draft's
    assert {o.why_stale for o in hotter.outputs() if o.state is OutputState.STALE} == {
        "made with other options (temperature 0.8 → 1.5)"}
    verdict = OutputSet.for_test_prompt(Workspace(workspace), workspace / "test_prompts" / "dictionary---river.txt",
                                        [0, 1]).judge(SamplingOptions(max_tokens=3, temperature=1.5))
    assert verdict.stale and [v.reason for v in verdict.verdicts] == [StaleReason.OTHER_RECIPE] * 2


def test_recipes_compare_only_what_both_name() -> None:
    sampled = Recipe.of(SamplingOptions(), greedy=False, grammar=None)
    older = Recipe({k: v for k, v in sampled.options.items() if k != "min_p"}, False, None)
    assert sampled.changes_since(older) == []  # an option added later is not compared
    hotter = Recipe.of(SamplingOptions(temperature=1.5, min_p=0.1), greedy=False, grammar=None)
    assert [c.describe() for c in hotter.changes_since(older)] == ["temperature 0.8 → 1.5"]
    greedy = Recipe.of(SamplingOptions(), greedy=True, grammar=None)
    assert [c.describe() for c in sampled.changes_since(greedy)] == ["temperature 0.0 → 0.8"]
    assert Recipe.from_json(sampled.to_json()) == sampled
    # the draft mode: compared only when both name one (a server's recipe and older records do not)
    drafted = Recipe.of(SamplingOptions(), greedy=False, grammar=None, draft="auto")
    plain = Recipe.of(SamplingOptions(), greedy=False, grammar=None, draft="off")
    assert [c.describe() for c in drafted.changes_since(plain)] == ["draft off → auto"]
    assert drafted.changes_since(sampled) == [] and sampled.changes_since(plain) == []
    before_drafts = {k: v for k, v in plain.to_json().items() if k != "draft"}
    assert Recipe.from_json(before_drafts) == sampled and Recipe.from_json(drafted.to_json()) == drafted
    assert Recipe.from_json({**drafted.to_json(), "draft": 1}) is None


# ----- what is in place of an output -----------------------------------------------------------


def test_a_folder_where_an_output_should_be_is_never_up_to_date_and_skipped_also_when_forced(
        workspace: Path, cli) -> None:
    blocker = workspace / TEST_PROMPTS_OUTPUTS / "dictionary---river.output-deterministic.txt"
    blocker.mkdir(parents=True)
    for forced in ((), ("-f",)):
        code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2", *forced)
        assert code == 1
        assert f"{blocker} is a folder, not a file" in err and "remove it" in err
        assert blocker.is_dir() and not list(blocker.iterdir())
        assert not re.search(r"[1-9]\d* up to date", err)
        assert (workspace / TEST_PROMPTS_OUTPUTS / "dictionary---library.output-deterministic.txt").is_file()


def _locked_temp(folder: Path, name: str) -> int:
    fd = os.open(write(folder / f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}", "half"), os.O_RDONLY)
    assert locks.lock_fd(fd)
    return fd


def test_temp_files_of_killed_runs_in_the_output_folders_are_removed(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    dead = [write(tmp_path / folder / f"{TEMP_PREFIX}dead{TEMP_SUFFIX}", "half")
            for folder in (DRAFTS_OUTPUTS, TEST_PROMPTS_OUTPUTS)]
    output = write(tmp_path / TEST_PROMPTS_OUTPUTS / "a---b.output-0.txt", "kept")
    elsewhere = write(tmp_path / "preludes" / f"{TEMP_PREFIX}other{TEMP_SUFFIX}", "not an output folder")
    live_fd = _locked_temp(tmp_path / DRAFTS_OUTPUTS, "live")
    try:
        removed = remove_stale_output_temp_files(workspace)
    finally:
        os.close(live_fd)
    assert sorted(removed) == sorted(dead)
    assert not any(path.exists() for path in dead)
    assert (tmp_path / DRAFTS_OUTPUTS / f"{TEMP_PREFIX}live{TEMP_SUFFIX}").exists()
    assert output.read_text() == "kept" and elsewhere.exists()


def test_removing_output_temp_files_of_a_workspace_without_output_folders_is_a_no_op(tmp_path: Path) -> None:
    assert remove_stale_output_temp_files(Workspace(tmp_path)) == []
