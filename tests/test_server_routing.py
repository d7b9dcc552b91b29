"""Routing over several servers (rendezvous hashing, slots in flight, back-off) and the
workspace's index of server-side preludes; no server process is needed for these."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cached_prompts.backend.interface import PreludeKind
from cached_prompts.errors import OptionsError
from cached_prompts.options import server_options, split_by_model
from cached_prompts.server.http import HttpConnection
from cached_prompts.server.index import ServerIndex, slot_file_name, tokens_digest
from cached_prompts.server.routing import ServerPool, ServerState, rank_servers


def states(*urls: str, capacity: int = 2) -> list[ServerState]:
    return [ServerState(HttpConnection(url, timeout=1.0), capacity=capacity) for url in urls]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rendezvous_moves_only_the_removed_servers_preludes() -> None:
    servers = states("http://a:1", "http://b:2", "http://c:3", "http://d:4")
    digests = [tokens_digest([1, 2, i]) for i in range(200)]
    before = {d: rank_servers(servers, d)[0].url for d in digests}
    assert len(set(before.values())) == 4  # every server is someone's first choice
    remaining = [s for s in servers if s.url != "http://c:3"]
    after = {d: rank_servers(remaining, d)[0].url for d in digests}
    moved = [d for d in digests if before[d] != after[d]]
    assert moved and all(before[d] == "http://c:3" for d in moved)
    # The ranking of a prelude is the same in every process: it depends only on URLs and tokens.
    assert [s.url for s in rank_servers(servers, digests[0])] == [s.url for s in rank_servers(
        list(reversed(servers)), digests[0])]


def test_a_down_server_is_skipped_until_its_backoff_ends_and_the_backoff_doubles() -> None:
    clock = FakeClock()
    pool = ServerPool(states("http://a:1", "http://b:2"), clock=clock, backoff_start=2.0, backoff_max=5.0)
    ranking = pool.ranking("x")
    first, second = ranking
    got = pool.acquire(ranking, 1)
    assert got == (first, 1)
    pool.release(first, 1)
    pool.mark_down(first, RuntimeError("refused"))
    pool.mark_down(first, RuntimeError("refused again by a request already in flight"))
    assert first.failures == 1 and first.down_until == 102.0
    assert pool.acquire(ranking, 1) == (second, 1)
    pool.release(second, 1)
    clock.now = 102.0
    assert pool.acquire(ranking, 1) == (first, 1)  # tried again after the back-off
    pool.release(first, 1)
    pool.mark_down(first, RuntimeError("still refused"))
    assert first.down_until == 106.0  # doubled
    pool.mark_down(second, RuntimeError("refused"))
    assert pool.acquire(ranking, 1) is None  # every server is down
    assert pool.seconds_to_retry(ranking) == pytest.approx(2.0)
    clock.now = 110.0
    pool.mark_down(first, RuntimeError("refused"))
    assert first.down_until == 115.0  # capped at backoff_max
    pool.mark_up(first)
    assert first.failures == 0


def test_no_more_outputs_in_flight_than_slots_and_waiters_keep_to_their_server() -> None:
    pool = ServerPool(states("http://a:1", "http://b:2", capacity=3))
    ranking = pool.ranking("y")
    top = ranking[0]
    assert pool.acquire(ranking, 5) == (top, 3)  # a request of 5 outputs is split to the slots
    got: list[tuple[ServerState, int] | None] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(ranking, 2)))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not got  # it waits for the prelude's server, not the idle other one
    pool.release(top, 3)
    waiter.join(timeout=5)
    assert got == [(top, 2)]


def test_server_options_precedence_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"servers": ["http://config:1"], "server_timeout": 30}
    assert server_options(config, {}, "x", environ={}).servers == ["http://config:1"]
    env = {"CACHED_PROMPTS_SERVER": "http://env:1/, http://env:2"}
    assert server_options(config, {}, "x", environ=env).servers == ["http://env:1", "http://env:2"]
    chosen = server_options(config, {"servers": ["http://flag:1"]}, "x", environ=env)
    assert chosen.servers == ["http://flag:1"] and chosen.server_timeout == 30.0
    with pytest.raises(OptionsError, match="http://HOST:PORT"):
        server_options({}, {"servers": ["localhost:8080"]}, "flags", environ={})
    with pytest.raises(OptionsError, match="server_api"):
        server_options({"server_api": "grpc"}, {}, "cached-prompts.toml", environ={})
    engine, sampling = split_by_model({"servers": ["http://a:1"], "n_ctx": 512, "temp": 0.5}, "x")
    assert engine.n_ctx == 512 and sampling.temperature == 0.5


def test_index_keeps_named_preludes_and_slot_files_across_instances(tmp_path: Path) -> None:
    cache = tmp_path / "llm_cache"
    first = ServerIndex(cache)
    name = slot_file_name("model-a", [1, 2, 3])
    assert name != slot_file_name("model-b", [1, 2, 3]) and name.endswith(".bin")
    first.note_slot_file(name, "http://a:1", 3, 3000)
    first.keep("dictionary", PreludeKind.EXTERNAL, "model-a", [1, 2, 3], name)
    first.keep("other", PreludeKind.EXTERNAL, "model-b", [4, 5], slot_file_name("model-b", [4, 5]))
    second = ServerIndex(cache)  # another process
    assert second.slot_servers(name) == ["http://a:1"]
    kept = second.kept(PreludeKind.EXTERNAL, "model-a")
    assert [(p.label, p.tokens, p.bytes) for p in kept] == [("dictionary", 3, 3000)]
    second.keep("dictionary", PreludeKind.EXTERNAL, "model-a", [1, 2, 3, 4], "x.bin")  # a new text replaces
    assert [p.tokens for p in second.kept(PreludeKind.EXTERNAL, "model-a")] == [4]
    assert second.drop("dictionary", PreludeKind.EXTERNAL) == 1
    assert second.drop("dictionary", PreludeKind.EXTERNAL) == 0
    second.forget_slot_file(name, "http://a:1")
    assert second.slot_servers(name) == []


def test_a_damaged_index_is_reported_and_started_afresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "llm_cache"
    cache.mkdir()
    (cache / "servers-index.json").write_bytes(b"\x00{not json")
    index = ServerIndex(cache)
    assert index.kept(PreludeKind.EXTERNAL, "m") == []
    assert "damaged" in caplog.text
    index.keep("a", PreludeKind.EXTERNAL, "m", [1, 2], "f.bin")
    assert [p.label for p in ServerIndex(cache).kept(PreludeKind.EXTERNAL, "m")] == ["a"]
