"""The per-prelude pool of earlier outputs (cache/draft_pool.py): fed and read by REPL requests,
checked like the other cache files (a corrupted, foreign or oversized pool is ignored with a
warning and rebuilt), bounded, removed with its prelude's entry; counters in records,
progress lines and the REPL's `info`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from cached_prompts.cache.draft_pool import (MAX_OUTPUT_TOKENS, MAX_POOL_TOKENS, DraftPool, outputs_sha256,
                                             pool_file)
from cached_prompts.cache.store import remove_leftovers
from cached_prompts.commands.progress import Progress
from cached_prompts.options import SamplingOptions
from cached_prompts.repl.session import Session
from cached_prompts.workspace.records import read_record

from .conftest import write
from .test_drafts import REPEAT_PRELUDE, REPEAT_PROMPT

NAME = "label.0123456789abcdef0123"
KEY = "k" * 64


def pool_at(folder: Path) -> DraftPool:
    folder.mkdir(parents=True, exist_ok=True)
    return DraftPool(folder, KEY, n_vocab=1000)


def test_a_pool_keeps_the_newest_outputs_within_its_bounds(tmp_path: Path) -> None:
    pool = pool_at(tmp_path)
    pool.add(NAME, [[1, 2, 3], [4, 5]])
    pool.add(NAME, [[1, 2, 3], [6] * (MAX_OUTPUT_TOKENS + 10)])
    assert pool.read(NAME) == [[4, 5], [1, 2, 3], [6] * MAX_OUTPUT_TOKENS]  # a repeat moves to the end, cut
    for start in range(0, 3 * MAX_POOL_TOKENS, 500):
        pool.add(NAME, [list(range(start % 900, start % 900 + 50))] * 1 + [[7] * 450])
    outputs = pool.read(NAME)
    assert sum(map(len, outputs)) <= MAX_POOL_TOKENS and outputs[-1] == [7] * 450


@pytest.mark.parametrize("spoil, reason", [
    (lambda data: data.replace(b"[1,2,3]", b"[1,2,4]"), "checksum mismatch"),
    (lambda data: data[:-7], "unreadable"),
    (lambda data: data.replace(KEY.encode(), b"x" * 64), "another cache entry or model"),
    (lambda data: b"\x00\xff" * 10, "unreadable"),
])
def test_a_spoiled_pool_is_ignored_with_a_warning_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              spoil, reason: str) -> None:
    pool = pool_at(tmp_path)
    pool.add(NAME, [[1, 2, 3]])
    path = pool_file(tmp_path, NAME)
    path.write_bytes(spoil(path.read_bytes()))
    with caplog.at_level(logging.WARNING):
        assert pool.read(NAME) == []
    assert f"draft pool {path.name} is invalid" in caplog.text and reason in caplog.text
    assert not path.exists()
    pool.add(NAME, [[8, 9]])
    assert pool.read(NAME) == [[8, 9]]


def test_a_pool_of_unknown_tokens_or_beside_another_entry_is_not_used(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    pool = pool_at(tmp_path)
    outputs = [[1, 5000]]
    data = {"format": 1, "settings_key": KEY, "digest": NAME.rsplit(".", 1)[1], "sha256": outputs_sha256(outputs),
            "outputs": outputs}
    pool_file(tmp_path, NAME).write_text(json.dumps(data))
    other = "label.ffffffffffffffffffff"
    shutil.copy(pool_file(tmp_path, NAME), pool_file(tmp_path, other))
    with caplog.at_level(logging.WARNING):
        assert pool.read(NAME) == [] and pool.read(other) == []
    assert "tokens this model does not have" in caplog.text and "another cache entry" in caplog.text


def test_a_pool_that_is_a_link_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pool = pool_at(tmp_path / "cache")
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    pool_file(tmp_path / "cache", NAME).symlink_to(target)
    with caplog.at_level(logging.WARNING):
        assert pool.read(NAME) == []
    assert "is invalid" in caplog.text and target.read_text() == "{}"


def test_a_pool_without_its_entry_is_a_leftover(tmp_path: Path) -> None:
    pool = pool_at(tmp_path)
    pool.add(NAME, [[1, 2]])
    assert pool_file(tmp_path, NAME).name in remove_leftovers(tmp_path)
    assert not pool_file(tmp_path, NAME).exists()


def single_prompt(session: Session, prompt: str) -> dict:
    line = json.dumps({"command": "single_prompt", "arguments": {
        "prelude_id": "repeat", "prelude": REPEAT_PRELUDE, "prompt": prompt}})
    answer = session.handle_request(line)
    assert answer["status"] == "Ok", answer
    return answer


def test_repl_answers_feed_the_pool_which_goes_with_its_prelude(make_runner, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    backend = make_runner(tmp_path / "llm_cache")
    session = Session(backend, SamplingOptions(max_tokens=12, temperature=0.3))
    single_prompt(session, REPEAT_PROMPT)
    entry = backend.cache.find_exact(backend.prelude_tokens(REPEAT_PRELUDE, "p"))
    pooled = backend.pool.read(entry.name)
    generated = backend.counters.generated_tokens  # the pool keeps the end token too
    assert len(pooled) == 1 and len(pooled[0]) in (generated, generated + 1)
    path = pool_file(backend.cache.folder, entry.name)
    path.write_bytes(path.read_bytes().replace(b"[", b"[1,", 2))  # one more token: checksum mismatch
    with caplog.at_level(logging.WARNING):
        single_prompt(session, REPEAT_PROMPT.replace("nu xi", "omicron"))
    assert "is invalid (" in caplog.text
    assert len(backend.pool.read(entry.name)) == 1  # rebuilt from the new answer
    info = session.handle_request('{command: "info"}')["value"]
    assert info["drafts"] == "auto"
    assert info["counters"]["drafted_tokens"] >= info["counters"]["accepted_tokens"] >= 0
    session.handle_request(json.dumps({"command": "drop_prelude", "arguments": {"prelude_id": "repeat"}}))
    assert not path.exists()


def test_records_and_progress_lines_count_drafts(cli, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ws"
    write(root / "preludes" / "repeat.txt", REPEAT_PRELUDE)
    write(root / "test_prompts" / "repeat---list.txt", REPEAT_PROMPT)
    code, _, _ = cli(root, "outputs-test-prompts", "-d", "--max-tokens", "16")
    assert code == 0
    record = read_record(root / "test_prompts_outputs" / "repeat---list.output-deterministic.txt")
    assert record.drafted_tokens >= record.accepted_tokens > 0
    progress = Progress(1, status_every=0.0)  # every status line is due
    progress.start_item("x", "y")
    logger = logging.getLogger("cached_prompts.commands.progress")
    logger.addHandler(caplog.handler)  # the CLI run above may have stopped propagation to the root
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            progress.generated(5, "greedy output", 16, drafted=6, accepted=4)
    finally:
        logger.removeHandler(caplog.handler)
    assert "4 of 6 draft tokens accepted" in caplog.text
