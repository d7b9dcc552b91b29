"""The CLI workflow on a real workspace: file naming, freshness, skipping, stats."""

from __future__ import annotations

import json

import os
import subprocess
import sys
from pathlib import Path

from cached_prompts.local.backend import LocalBackend as Runner

from .conftest import PRELUDE, age_tree, generate, prompt_for, write

OUTPUTS = "test_prompts_outputs"


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.txt"))}


def test_drafts_get_numbered_outputs(cli, workspace: Path) -> None:
    code, out, _ = cli(workspace, "outputs-for-drafts", "-n", "2", "--max-tokens", "3")
    assert code == 0 and out == ""
    names = sorted(p.name for p in (workspace / "prelude_drafts_outputs").glob("*.txt"))
    assert names == ["dictionary.output-0.txt", "dictionary.output-1.txt"]


def test_test_prompt_outputs_and_freshness(cli, workspace: Path) -> None:
    code, _, _ = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "3")
    assert code == 0
    outputs = workspace / OUTPUTS
    assert sorted(mtimes(outputs)) == [
        "dictionary---library.output-0.txt", "dictionary---library.output-1.txt",
        "dictionary---river.output-0.txt", "dictionary---river.output-1.txt",
        "dictionary-long---umbrella.output-0.txt", "dictionary-long---umbrella.output-1.txt"]
    age_tree(workspace)
    before = mtimes(outputs)

    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "3")
    assert code == 0 and "3 up to date" in err
    assert mtimes(outputs) == before, "a rerun must regenerate nothing"

    (workspace / "preludes" / "dictionary-long.txt").touch()
    code, _, _ = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "3")
    assert code == 0
    after = mtimes(outputs)
    changed = sorted(name for name in after if after[name] != before[name])
    assert changed == ["dictionary-long---umbrella.output-0.txt", "dictionary-long---umbrella.output-1.txt"]

    code, _, _ = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "3", "-f")
    assert code == 0
    forced = mtimes(outputs)
    assert all(forced[name] != after[name] for name in forced)


def test_deterministic_output_matches_uncached_engine(cli, workspace: Path, make_runner) -> None:
    code, _, _ = cli(workspace, "precache-preludes")
    assert code == 0
    code, _, _ = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "5")
    assert code == 0
    written = (workspace / OUTPUTS / "dictionary---river.output-deterministic.txt").read_text("utf-8")
    runner: Runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    from .conftest import GREEDY

    expected = generate(runner, prelude, runner.joint_tokens(PRELUDE, prompt_for("river")),
                               GREEDY.model_copy(update={"max_tokens": 5}), [None], label="p")[0]
    assert written == expected


def test_precache_computes_once_and_recomputes_a_changed_prelude(cli, workspace: Path) -> None:
    code, _, err = cli(workspace, "precache-preludes")
    assert code == 0 and "preludes: 2 computed, 0 already cached" in err
    assert "built on a cached prefix" in err  # dictionary-long extends dictionary
    _, _, err = cli(workspace, "precache-preludes")
    assert "preludes: 0 computed, 2 already cached" in err
    write(workspace / "preludes" / "dictionary.txt", PRELUDE + "pear<|im_end|>\n")
    _, _, err = cli(workspace, "precache-preludes")
    assert "preludes: 1 computed, 1 already cached" in err
    entries = sorted(p.name.split(".")[0] for p in (workspace / "llm_cache").glob("*.meta.json"))
    assert entries == ["dictionary", "dictionary-long"], "the old entry of a changed prelude is replaced"


def test_bad_prompts_are_skipped_and_the_rest_is_done(cli, workspace: Path) -> None:
    write(workspace / "test_prompts" / "no-separator.txt", "hello")
    write(workspace / "test_prompts" / "missing---x.txt", "hello")
    write(workspace / "test_prompts" / "dictionary---huge.txt", "word " * 1100)
    write(workspace / "test_prompts" / "notes.md", "not an input")
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2")
    assert code == 1
    assert "no-separator.txt: a test prompt's name must be PRELUDE---ID.txt" in err
    assert "missing---x.txt: its prelude preludes/missing.txt does not exist" in err
    assert "dictionary---huge.txt" in err and "the context only 1024" in err
    outputs = sorted(p.name for p in (workspace / OUTPUTS).glob("*.txt"))
    assert outputs == ["dictionary---library.output-deterministic.txt",
                       "dictionary---river.output-deterministic.txt",
                       "dictionary-long---umbrella.output-deterministic.txt"]


def test_cyrillic_and_space_names_work(cli, workspace: Path) -> None:
    name = "РПД-критерии компетенций"
    write(workspace / "preludes" / f"{name}.txt", PRELUDE.replace("apple", "яблоко"))
    write(workspace / "test_prompts" / f"{name}---Большие данные ОПК-3.txt", prompt_for("данные"))
    code, _, _ = cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "2")
    assert code == 0
    assert (workspace / OUTPUTS / f"{name}---Большие данные ОПК-3.output-0.txt").is_file()
    assert any(p.name.startswith("РПД-критерии_компетенций-") for p in (workspace / "llm_cache").iterdir())


def test_token_stats_are_real_counts_in_the_original_format(cli, workspace: Path, make_runner) -> None:
    cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "3")
    code, out, _ = cli(workspace, "show-stats-on-tokens-number")
    assert code == 0
    runner = make_runner(None)
    prelude = runner.count_tokens(PRELUDE, at_start=True)
    prompt_text = prompt_for("river")
    prompt = runner.count_tokens(prompt_text, at_start=False)
    together = runner.count_tokens(PRELUDE + prompt_text, at_start=True)
    output_text = (workspace / OUTPUTS / "dictionary---river.output-0.txt").read_text("utf-8")
    everything = runner.count_tokens(PRELUDE + prompt_text + output_text, at_start=True)
    lines = out.splitlines()
    assert lines[:3] == ["Context length: 1024", "", '# Repository "prelude_drafts"']
    assert '# Repository "preludes"' in lines and '# Repository "test_prompts"' in lines
    assert f'"preludes/dictionary.txt" tokens: {prelude}' in lines
    assert f'"test_prompts/dictionary---river.txt" tokens: {prompt}' in lines
    assert (f'- with its prelude "preludes/dictionary.txt": {prelude} + {together - prelude} = {together}'
            in lines)
    assert (f'  * with its output "test_prompts_outputs/dictionary---river.output-0.txt": '
            f"{everything - together} + {prelude} + {together - prelude} = {everything}") in lines


def test_stats_add_up_to_the_joint_count_when_a_prelude_ends_mid_word(cli, workspace: Path, make_runner) -> None:
    """The model sees the concatenated text tokenized as one: the sum is that count, not
    the prelude's count plus the prompt's."""
    write(workspace / "preludes" / "split.txt", PRELUDE + "umbr")
    write(workspace / "test_prompts" / "split---x.txt", "ella<|im_end|>\n<|im_start|>assistant\n")
    code, out, _ = cli(workspace, "show-stats-on-tokens-number", "--json")
    runner = make_runner(None)
    joint = runner.count_tokens(PRELUDE + prompt_for("umbrella"), at_start=True)
    separate = runner.count_tokens(PRELUDE + "umbr", at_start=True) + runner.count_tokens(
        "ella<|im_end|>\n<|im_start|>assistant\n", at_start=False)
    assert joint != separate, "the split should fall inside a token"
    (item,) = [f for f in json.loads(out)["folders"]["test_prompts"] if f["name"] == "split---x.txt"]
    assert item["together"] == joint


def test_errors_are_one_line_and_actionable(cli, workspace: Path, tmp_path: Path) -> None:
    code, _, err = cli(workspace, "precache-preludes", "--lp-model-path", str(tmp_path / "nope.gguf"))
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "nope.gguf does not exist" in err and "--lp-model-path" in err
    code, _, err = cli(tmp_path / "missing", "precache-preludes")
    assert code == 1 and "does not exist" in err
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "0")
    assert code == 1 and "at least 1" in err


def test_config_file_sets_options_and_rejects_unknown_keys(cli, workspace: Path) -> None:
    write(workspace / "cached-prompts.toml", "max_tokens = 2\ntemperature = 0.0\n")
    code, _, _ = cli(workspace, "outputs-for-drafts", "-n", "1")
    assert code == 0
    write(workspace / "cached-prompts.toml", "max_tokenz = 2\n")
    code, _, err = cli(workspace, "outputs-for-drafts", "-n", "1")
    assert code == 1 and "max_tokenz" in err


def test_tfs_z_is_accepted_with_a_warning(cli, workspace: Path) -> None:
    code, _, err = cli(workspace, "outputs-for-drafts", "-n", "1", "--max-tokens", "1", "--lp-tfs-z", "0.9")
    assert code == 0 and "tfs_z=0.9 is ignored" in err


def test_main_py_runs_the_cli_with_full_help() -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "main.py"), "--full-help"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0
    for command in ("precache-preludes", "outputs-for-drafts", "outputs-test-prompts",
                    "show-stats-on-tokens-number", "stdio-json-repl", "--lp-mirostat-eta", "--force-outputs",
                    "cache prune", "--max-size"):
        assert command in result.stdout
