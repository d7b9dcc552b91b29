"""The local backend behind the Backend interface: joint tokenization, output records and
model freshness, restore failures, a full disk, and the REPL's counters."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from cached_prompts.backend.interface import PreludeSource, reusable_length
from cached_prompts.cache.store import CacheStore
from cached_prompts.options import SamplingOptions, derive_seed
from cached_prompts.repl.session import Session
from cached_prompts.workspace.records import read_record

from .conftest import GREEDY, PRELUDE, generate, prompt_for, write

OUTPUTS = "test_prompts_outputs"


def test_a_prelude_ending_mid_word_gets_the_answer_of_the_whole_text(cli, workspace: Path) -> None:
    write(workspace / "preludes" / "cut.txt", PRELUDE + "umbr")
    write(workspace / "test_prompts" / "cut---x.txt", "ella<|im_end|>\n<|im_start|>assistant\n")
    code, _, _ = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "8")
    assert code == 0
    cut = (workspace / OUTPUTS / "cut---x.output-deterministic.txt").read_text("utf-8")
    whole = (workspace / OUTPUTS / "dictionary-long---umbrella.output-deterministic.txt")
    # dictionary-long has another example; compare with the same text split at the word boundary
    write(workspace / "test_prompts" / "dictionary---umbrella.txt", prompt_for("umbrella"))
    code, _, _ = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "8")
    assert code == 0 and whole.is_file()
    assert cut == (workspace / OUTPUTS / "dictionary---umbrella.output-deterministic.txt").read_text("utf-8")
    assert cut


def test_joint_tokens_reuse_the_stored_state_up_to_where_the_split_changes_tokens(make_runner) -> None:
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    full = runner.joint_tokens(PRELUDE, prompt_for("river"))
    assert reusable_length(prelude, full) == len(prelude) - 1
    # "umbr" + "ella" retokenizes the prelude's last two tokens: only the part before is reused
    cut = runner.prelude_tokens(PRELUDE + "umbr", "p")
    cut_full = runner.joint_tokens(PRELUDE + "umbr", "ella")
    assert reusable_length(cut, cut_full) == len(cut) - 2
    assert cut_full[:len(cut) - 2] == cut[:-2] and cut_full[len(cut) - 2] != cut[-2]


def test_cached_equals_uncached_when_the_split_changes_the_prelude_tokens(make_runner, tmp_path: Path) -> None:
    text = PRELUDE + "umbr"
    uncached = make_runner(None)
    prelude = uncached.prelude_tokens(text, "p")
    full = uncached.joint_tokens(text, "ella<|im_end|>\n<|im_start|>assistant\n")
    expected = generate(uncached, prelude, full, GREEDY, [None])
    generate(make_runner(tmp_path / "cache"), prelude, full, GREEDY, [None])
    restored = make_runner(tmp_path / "cache")
    assert generate(restored, prelude, full, GREEDY, [None]) == expected
    assert restored.counters.sources == ["cache"]


def test_every_output_has_a_record_of_what_made_it(cli, workspace: Path, make_runner) -> None:
    code, _, _ = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "3", "--seed", "5")
    assert code == 0
    backend = make_runner(None)
    record = read_record(workspace / OUTPUTS / "dictionary---river.output-1.txt")
    assert record is not None
    assert (record.model_id, record.backend, record.seed) == (backend.model_id, "local", derive_seed(5, 1))
    assert 0 < record.generated_tokens <= 3 and record.n_ctx == 1024 and record.seconds > 0
    assert record.prelude_tokens == len(backend.prelude_tokens(PRELUDE, "p"))
    assert record.sampling["max_tokens"] == 3 and record.sampling["temperature"] == 0.8
    code, _, _ = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "3")
    greedy = read_record(workspace / OUTPUTS / "dictionary---river.output-deterministic.txt")
    assert greedy.seed is None and greedy.sampling["temperature"] == 0.0
    assert greedy.run_id != record.run_id


def test_outputs_made_by_another_model_are_made_again(cli, workspace: Path, model_path: Path,
                                                     tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_path, other)
    with other.open("ab") as handle:  # same weights, another file: another model id
        handle.write(b"\0" * 64)
    assert cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2")[0] == 0
    output = workspace / OUTPUTS / "dictionary---river.output-deterministic.txt"
    before = output.stat().st_mtime_ns
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2")
    assert code == 0 and output.stat().st_mtime_ns == before, "the same model: nothing to redo"
    code, _, err = cli(workspace, "--lp-model-path", str(other), "outputs-test-prompts", "-d", "--max-tokens", "2")
    assert code == 0 and output.stat().st_mtime_ns != before
    assert "were made by the model" in err and "other.gguf" in err
    assert read_record(output).model == "other.gguf"


def test_an_entry_that_cannot_be_restored_is_replaced(make_runner, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    first = make_runner(cache)
    prelude = first.prelude_tokens(PRELUDE, "p")
    first.prepare_prelude(prelude, "p")
    (entry,) = CacheStore(cache, first.settings).entries()
    # A state llama.cpp refuses, with metadata that matches it (size and checksum).
    kv = cache / f"{entry.name}.kv"
    kv.write_bytes(b"\1" * 64)
    meta_path = cache / f"{entry.name}.meta.json"
    meta = json.loads(meta_path.read_text())
    import hashlib
    meta.update(state_bytes=64, state_sha256=hashlib.sha256(b"\1" * 64).hexdigest())
    meta_path.write_text(json.dumps(meta))
    second = make_runner(cache)
    assert second.prepare_prelude(prelude, "p").source == PreludeSource.COMPUTED
    assert "could not restore it" in caplog.text
    third = make_runner(cache)
    assert third.prepare_prelude(prelude, "p").source == PreludeSource.CACHE


def test_a_full_disk_costs_the_cache_entry_not_the_outputs(cli, workspace: Path, monkeypatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import cached_prompts.cache.store as cache_module

    real_atomic_write = cache_module.atomic_write

    def full_disk(path: Path, chunks, **kwargs) -> None:
        def no_space():
            raise OSError(errno.ENOSPC, "No space left on device")
            yield b""
        real_atomic_write(path, no_space(), **kwargs)

    monkeypatch.setattr(cache_module, "atomic_write", full_disk)
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2",
                       "--lp-engine-process", "in-process")  # the patched function runs in this process
    assert code == 0, err
    assert len(list((workspace / OUTPUTS).glob("*.txt"))) == 3
    assert "was not stored" in err
    assert not list((workspace / "llm_cache").glob("*.kv"))


def test_the_repl_counts_a_computed_prelude_once(make_runner, tmp_path: Path) -> None:
    session = Session(make_runner(tmp_path / "llm_cache"), SamplingOptions(max_tokens=2))
    line = json.dumps({"command": "single_prompt", "arguments": {
        "prelude_id": "d", "prelude": PRELUDE, "prompt": prompt_for("river")}})
    assert session.handle_request(line)["status"] == "Ok"
    counters = session.backend.counters
    tokens = len(session.backend.prelude_tokens(PRELUDE, "p")) - 1
    assert (counters.prelude_tokens_computed, counters.prelude_tokens_reused) == (tokens, 0)
    assert session.handle_request(line)["status"] == "Ok"
    assert (counters.prelude_tokens_computed, counters.prelude_tokens_reused) == (tokens, tokens)


@pytest.mark.parametrize("ids", [("a b", "a?b"), ("x" * 60 + "one", "x" * 60 + "two")])
def test_prelude_ids_with_the_same_file_name_form_get_their_own_entries(make_runner, tmp_path: Path,
                                                                       ids: tuple[str, str]) -> None:
    session = Session(make_runner(tmp_path / "llm_cache"), SamplingOptions(max_tokens=2))
    for prelude_id in ids:
        line = json.dumps({"command": "precache", "arguments": {"prelude_id": prelude_id, "prelude": PRELUDE}})
        assert session.handle_request(line)["status"] == "Ok"
    listed = session.handle_request('{command: "list_preludes"}')["value"]
    assert sorted(item["prelude_id"] for item in listed) == sorted(ids)
    dropped = session.handle_request(json.dumps({"command": "drop_prelude", "arguments": {"prelude_id": ids[1]}}))
    assert dropped["value"] == 1
    assert [item["prelude_id"] for item in session.handle_request('{command: "list_preludes"}')["value"]] == [ids[0]]


def test_input_files_are_read_only_when_regular_and_bounded(cli, workspace: Path, tmp_path: Path) -> None:
    shared = write(tmp_path / "shared-prelude.txt", PRELUDE)
    # a prelude shared by a link to outside the workspace is read when the user allows it
    (workspace / "preludes" / "linked.txt").symlink_to(shared)
    write(workspace / "test_prompts" / "linked---x.txt", prompt_for("river"))
    with (workspace / "test_prompts" / "dictionary---huge.txt").open("wb") as handle:
        handle.truncate(17 << 20)  # sparse: bigger than any input could need
    code, _, err = cli(workspace, "--follow-links-outside", "outputs-test-prompts", "-d", "--max-tokens", "2")
    assert code == 1
    assert "dictionary---huge.txt" in err and "larger than" in err
    assert (workspace / OUTPUTS / "linked---x.output-deterministic.txt").is_file()
