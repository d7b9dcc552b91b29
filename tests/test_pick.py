"""`pick DRAFT`: candidates ranked by their test prompts' pass rate, on the real model; the
draft's state reused for every candidate, nothing of them stored; --promote == promote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cached_prompts.backend.interface import PreludeSource
from cached_prompts.commands.pick import pick
from cached_prompts.options import SamplingOptions
from cached_prompts.workspace.layout import Workspace

from .conftest import CHATML_SYSTEM, GREEDY, PRELUDE, generate, prompt_for, write

# Greedy on SmolLM2-135M: after "APPLE: A round fruit..." it answers "RIVER: ...", "UMBRA: ...";
# after "A round fruit..." it answers in plain sentences. The expectation asks for the first.
PLAIN = "A round fruit with crisp white flesh."
LABELLED = "APPLE: A round fruit with crisp white flesh."
FORMAT = '[[expect]]\nname = "WORD: definition"\nregex = "^[A-Za-z]+: "\n[[expect]]\nfinished = true\n'
FLAGS = ("--max-tokens", "24", "--stop", "<|im_end|>")


@pytest.fixture
def pick_workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    write(root / "prelude_drafts" / "dictionary.txt", CHATML_SYSTEM + "apple<|im_end|>\n<|im_start|>assistant\n")
    write(root / "prelude_drafts_outputs" / "dictionary.output-0.txt", PLAIN)
    write(root / "prelude_drafts_outputs" / "dictionary.output-1.txt", LABELLED)
    for word in ("river", "library", "umbrella"):
        write(root / "test_prompts" / f"dictionary---{word}.txt", prompt_for(word))
    write(root / "preludes" / "dictionary.expect.toml", FORMAT)
    return root


def test_pick_ranks_the_example_that_follows_the_format_first(cli, pick_workspace: Path) -> None:
    code, out, err = cli(pick_workspace, "pick", "dictionary", "-d", "--json", *FLAGS)
    assert code == 0, err
    result = json.loads(out)
    assert [c["output"] for c in result["candidates"]] == [1, 0]
    assert result["winner"] == 1
    assert result["candidates"][0] == {"output": 1, "passed": 3, "total": 3, "rate": 1.0,
                                       "interval": pytest.approx([0.4385, 1.0], abs=1e-4), "failed": {}}
    assert result["candidates"][1]["failed"]["WORD: definition"] == 3
    assert (result["draft"], result["for"]) == ("prelude_drafts/dictionary.txt", "dictionary")
    assert not list((pick_workspace / "llm_cache").glob("*.kv"))  # nothing of the candidates stored
    assert not (pick_workspace / "preludes" / "dictionary.txt").exists()
    code, out, err = cli(pick_workspace, "pick", "dictionary", "-d", *FLAGS)
    assert code == 0, err
    assert "winner: output 1" in out
    # 3/3 against 0/3: the 95% intervals [44%, 100%] and [0%, 56%] overlap
    assert "not distinguishable with one greedy output per prompt: try -n 20" in out


def test_promote_writes_exactly_what_promote_writes(cli, pick_workspace: Path, tmp_path: Path) -> None:
    by_hand = tmp_path / "by-hand"
    shutil.copytree(pick_workspace, by_hand)
    code, _, err = cli(by_hand, "promote", "dictionary", "1", "--as", "dict")
    assert code == 0, err
    code, out, err = cli(pick_workspace, "pick", "dictionary", "-d", "--promote", "--as", "dict", *FLAGS)
    assert code == 0, err
    assert "promoted to preludes/dict.txt" in out
    written = (pick_workspace / "preludes" / "dict.txt").read_bytes()
    assert written == (by_hand / "preludes" / "dict.txt").read_bytes()
    assert LABELLED.encode() in written
    # The name is taken now: refused before any work, as promote refuses it
    code, _, err = cli(pick_workspace, "pick", "dictionary", "-d", "--promote", "--as", "dict", *FLAGS)
    assert code == 1 and "preludes/dict.txt already exists; pass -f" in err


def test_no_candidate_reaching_the_thresholds_is_exit_status_1(cli, pick_workspace: Path) -> None:
    write(pick_workspace / "preludes" / "dictionary.expect.toml", '[[expect]]\nequals = "never said"\n')
    code, out, err = cli(pick_workspace, "pick", "dictionary", "-d", "--json", "--promote", *FLAGS)
    assert code == 1
    assert json.loads(out)["winner"] is None
    assert "nothing promoted" in err
    assert not (pick_workspace / "preludes" / "dictionary.txt").exists()


def test_pick_explains_what_it_lacks(cli, pick_workspace: Path) -> None:
    (pick_workspace / "preludes" / "dictionary.expect.toml").unlink()
    code, _, err = cli(pick_workspace, "pick", "dictionary", "-d")
    assert code == 1 and "no test prompt test_prompts/dictionary---*.txt with expectations" in err
    code, _, err = cli(pick_workspace, "pick", "nothing", "-d")
    assert code == 1 and "there is no draft prelude_drafts/nothing.txt" in err
    with pytest.raises(SystemExit) as exited:  # argparse: -n and -d exclude each other
        cli(pick_workspace, "pick", "dictionary", "-d", "-n", "3")
    assert exited.value.code == 2


def test_the_drafts_state_is_computed_once_and_nothing_is_stored(make_runner, pick_workspace: Path) -> None:
    backend = make_runner(pick_workspace / "llm_cache")
    sampling = SamplingOptions(max_tokens=8, stop=["<|im_end|>"])
    result = pick(Workspace(pick_workspace), backend, "dictionary", sampling, n=3)
    assert [c.total for c in result.candidates] == [9, 9]
    draft = len(backend.prelude_tokens((pick_workspace / "prelude_drafts" / "dictionary.txt").read_text(), "d")) - 1
    sources = backend.counters.sources
    assert sources[:3] == [PreludeSource.COMPUTED.value, PreludeSource.PREFIX.value, PreludeSource.PREFIX.value]
    # each candidate reused the draft's state: only its answer and the next turn were computed
    assert backend.counters.prelude_tokens_reused >= 2 * (draft - 2)
    assert backend.counters.prelude_tokens_computed < draft + 2 * 30
    assert backend.cache.entries() == []


def test_a_prelude_built_on_the_one_in_memory_answers_as_one_computed_afresh(make_runner) -> None:
    reused, fresh = make_runner(None), make_runner(None)
    longer = PRELUDE + "bicycle<|im_end|>\n<|im_start|>assistant\nA vehicle with two wheels.<|im_end|>\n<|im_start|>user\n"
    first = reused.prelude_tokens(PRELUDE, "a")
    generate(reused, first, reused.joint_tokens(PRELUDE, prompt_for("river")), GREEDY, [None], store=False)
    tokens = reused.prelude_tokens(longer, "b")
    full = reused.joint_tokens(longer, prompt_for("river"))
    built = generate(reused, tokens, full, GREEDY, [None], store=False)
    assert reused.counters.sources[-1] == PreludeSource.PREFIX.value
    assert reused.counters.prelude_tokens_reused == len(first) - 1
    assert built == generate(fresh, tokens, full, GREEDY, [None], store=False)
    assert fresh.counters.sources == [PreludeSource.COMPUTED.value]
