"""The server backend against real llama-server processes (tests/server_fixtures.py) serving
the same SmolLM2 model: the whole workflow, the REPL, affinity, failover, slot files, the
OpenAI path and the errors a user sees. Answers are a few tokens long."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cached_prompts.backend.interface import PreludeSource
from cached_prompts.errors import ServerDownError, ServerError
from cached_prompts.options import SamplingOptions, ServerOptions
from cached_prompts.repl.session import Session
from cached_prompts.server.backend import ServerBackend
from cached_prompts.server.index import tokens_digest

from .conftest import CHATML_SYSTEM, age_tree, prompt_for, write
from .server_fixtures import LlamaServer

SHORT = ("--max-tokens", "4")


def with_servers(*servers: LlamaServer, api: str | None = None) -> list[str]:
    flags = [arg for server in servers for arg in ("--server", server.url)]
    return flags + (["--server-api", api] if api else [])


def open_server_backend(tmp_path: Path, *servers: LlamaServer, **options: Any) -> ServerBackend:
    return ServerBackend(ServerOptions(servers=[s.url for s in servers], **options), tmp_path / "llm_cache",
                         fallback_n_ctx=1024)


def outputs(root: Path, folder: str = "test_prompts_outputs") -> dict[str, str]:
    out = root / folder
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.txt"))} if out.is_dir() else {}


# ----- one server ------------------------------------------------------------------------------


def test_whole_workflow_against_one_server(cli, workspace: Path, llama_servers, tmp_path: Path) -> None:
    server = llama_servers(slot_dir=tmp_path / "slots")
    # A model path that does not exist: with a server, no model file is loaded here.
    flags = [*with_servers(server), "--lp-model-path", str(tmp_path / "not-loaded.gguf"), *SHORT]
    code, _, err = cli(workspace, "precache-preludes", *flags)
    assert code == 0, err
    assert "preludes: 2 computed" in err
    evaluated = server.prompt_tokens()

    code, _, err = cli(workspace, "outputs-for-drafts", "-n", "2", *flags)
    assert code == 0, err
    assert set(outputs(workspace, "prelude_drafts_outputs")) == {"dictionary.output-0.txt", "dictionary.output-1.txt"}

    evaluated = server.prompt_tokens()
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", *flags)
    assert code == 0, err
    made = outputs(workspace)
    assert len(made) == 6 and all(made.values())
    assert "prompt tokens came from the servers' caches" in err
    # The preludes were precached: each prompt evaluated only its own tokens (and the
    # prelude's last one again, for its logits).
    with open_server_backend(tmp_path, server) as backend:
        own = sum(backend.count_tokens(prompt_for(word), at_start=False) + 1
                  for word in ("river", "library", "umbrella"))
    assert server.prompt_tokens() - evaluated <= own

    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", *flags)
    assert code == 0 and "outputs: 0 written" in err  # fresh
    age_tree(workspace)
    (workspace / "preludes" / "dictionary.txt").touch()
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", *flags)
    assert "outputs: 4 written" in err  # only the prompts of the changed prelude

    code, _, err = cli(workspace, "outputs-test-prompts", "-d", *flags)
    assert code == 0 and "outputs: 3 written" in err
    assert len([name for name in outputs(workspace) if name.endswith(".output-deterministic.txt")]) == 3
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "-f", *flags)
    assert code == 0 and "outputs: 3 written" in err

    code, served_stats, err = cli(workspace, "show-stats-on-tokens-number", "--json", *flags)
    assert code == 0, err
    code, local_stats, _ = cli(workspace, "show-stats-on-tokens-number", "--json")
    assert json.loads(served_stats)["folders"] == json.loads(local_stats)["folders"]  # the server's tokenizer

    code, out, err = cli(workspace, "score-preludes", *flags)  # servers give no prompt log-probabilities
    assert code == 1 and out == "", err
    assert "does not give the log-probability of every prompt token" in err and "without --server" in err
    assert "Traceback" not in err

    # Outputs made by the server's model are stale for the local engine's model (by its file hash).
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "2")
    assert code == 0 and "were made by the model" in err and "outputs: 6 written" in err


def test_repl_against_a_server(llama_servers, tmp_path: Path) -> None:
    server = llama_servers()
    dictionary = CHATML_SYSTEM

    def ask(session: Session, command: str, **arguments: Any) -> Any:
        response = session.handle_request(json.dumps({"command": command, "arguments": arguments}))
        assert response["status"] == "Ok", response["message"]
        return response["value"]

    with open_server_backend(tmp_path, server) as backend:
        session = Session(backend, SamplingOptions(max_tokens=4))
        assert ask(session, "precache", prelude_id="dict", prelude=dictionary)["source"] == "computed"
        assert ask(session, "precache", prelude_id="dict", prelude=dictionary)["source"] == "server"
        answers = ask(session, "single_prompt", prelude_id="dict", prelude=dictionary, prompt=prompt_for("river"),
                      number_of_random_outputs=2, add_nonrandom_output_to_front=True)
        assert len(answers) == 3
        again = ask(session, "single_prompt", prelude_id="dict", prelude=dictionary, prompt=prompt_for("river"),
                    number_of_random_outputs=2, add_nonrandom_output_to_front=True)
        assert again[0] == answers[0]  # the greedy answer
        assert ask(session, "count_tokens", text="river<|im_end|>\n") == 3
        info = ask(session, "info")
        assert info["backend"] == "llama-server" and info["servers"][0]["url"] == server.url
        assert info["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert info["counters"]["server_cached_tokens"] > 0
        assert info["counters"]["generated_tokens"] > 0
    with open_server_backend(tmp_path, server) as backend:  # another process sees the kept id
        session = Session(backend, SamplingOptions(max_tokens=4))
        listed = ask(session, "list_preludes")
        assert [(p["prelude_id"], p["tokens"]) for p in listed] == [("dict", len(backend.tokenize(dictionary,
                                                                                                  at_start=True)))]
        assert ask(session, "drop_prelude", prelude_id="dict") == 1
        assert ask(session, "list_preludes") == []


# ----- several servers ----------------------------------------------------------------------------


def preludes_for_each(backend: ServerBackend, servers: list[LlamaServer]) -> dict[str, str]:
    """A prelude text whose first choice is each server (found by trying a few variants)."""
    found: dict[str, str] = {}
    for i in range(64):
        text = CHATML_SYSTEM.replace("concise dictionary", f"concise dictionary number {i}")
        first = backend.pool.ranking(tokens_digest(backend.tokenize(text, at_start=True)))[0].url
        found.setdefault(first, text)
        if len(found) == len(servers):
            return found
    raise AssertionError("no prelude found for some server")


def wait_until_busy(server: LlamaServer) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not server.busy():
        time.sleep(0.01)


def two_server_workspace(root: Path, texts: list[str], words: list[str]) -> None:
    for index, text in enumerate(texts):
        write(root / "preludes" / f"p{index}.txt", text)
        for word in words:
            write(root / "test_prompts" / f"p{index}---{word}.txt", prompt_for(word))


def test_each_prelude_is_evaluated_on_one_server(cli, llama_servers, tmp_path: Path) -> None:
    servers = [llama_servers(slot_dir=tmp_path / f"slots-{i}") for i in range(2)]
    with open_server_backend(tmp_path, *servers) as backend:
        by_server = preludes_for_each(backend, servers)
        lengths = {url: len(backend.tokenize(text, at_start=True)) for url, text in by_server.items()}
    root = tmp_path / "ws"
    two_server_workspace(root, list(by_server.values()), ["river", "library"])
    code, _, err = cli(root, "precache-preludes", *with_servers(*servers))
    assert code == 0, err
    for server in servers:  # each server evaluated exactly its own prelude
        assert server.prompt_tokens() == lengths[server.url]
    code, _, err = cli(root, "outputs-test-prompts", "-n", "3", *SHORT, *with_servers(*servers))
    assert code == 0, err
    for server in servers:
        # Only the prompts' own tokens: far fewer than a prelude, so no prelude moved.
        assert 0 < server.prompt_tokens() - lengths[server.url] < min(lengths.values())


def test_a_server_killed_mid_run_loses_no_output(cli, llama_servers, tmp_path: Path) -> None:
    servers = [llama_servers(), llama_servers()]
    with open_server_backend(tmp_path, *servers) as backend:
        by_server = preludes_for_each(backend, servers)
    victim = servers[0]
    root = tmp_path / "ws"
    words = ["river", "library", "umbrella", "mountain"]
    two_server_workspace(root, [by_server[victim.url], by_server[servers[1].url]], words)
    assert cli(root, "precache-preludes", *with_servers(*servers))[0] == 0

    killer = threading.Thread(target=lambda: (wait_until_busy(victim), victim.kill()))
    killer.start()
    try:
        code, _, err = cli(root, "outputs-test-prompts", "-n", "3", "--max-tokens", "48",
                           *with_servers(*servers))
    finally:
        killer.join()
    assert victim.process.poll() is not None, "the server was not killed during the run"
    assert code == 0, err
    assert len(outputs(root)) == 2 * len(words) * 3
    assert f"{victim.url} dropped the connection" in err or f"{victim.url} cannot be reached" in err
    assert "Its work moves to the next server" in err
    assert f"outputs: taken over by {servers[1].url} from {victim.url}" in err


def test_when_no_server_can_make_an_output_it_is_named_and_the_exit_status_is_1(
        cli, llama_servers, workspace: Path) -> None:
    server = llama_servers()
    assert cli(workspace, "precache-preludes", *with_servers(server))[0] == 0
    killer = threading.Thread(target=lambda: (wait_until_busy(server), server.kill()))
    killer.start()
    try:
        code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", "--max-tokens", "48", *with_servers(server))
    finally:
        killer.join()
    assert code == 1
    assert f"{server.url} cannot be reached" in err
    assert "skipped dictionary-long---umbrella.txt" in err  # the input being generated is named
    assert outputs(workspace) == {}


# ----- slot files -----------------------------------------------------------------------------------


def test_a_restarted_server_restores_a_precached_prelude_from_its_slot_file(
        cli, workspace: Path, llama_servers, tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    first = llama_servers(slot_dir=slots)
    code, _, err = cli(workspace, "precache-preludes", *with_servers(first))
    assert code == 0, err
    saved = sorted(p.name for p in slots.iterdir())
    assert len(saved) == 2 and all(name.startswith("cached-prompts-") for name in saved)
    first.stop()

    again = llama_servers(slot_dir=slots, port=first.port)
    with open_server_backend(workspace, again) as backend:
        text = (workspace / "preludes" / "dictionary.txt").read_text(encoding="utf-8")
        tokens = backend.tokenize(text, at_start=True)
        load = backend.prepare_prelude(tokens, "dictionary")
    assert load.source == PreludeSource.SLOT and load.computed_tokens == 0
    assert again.prompt_tokens() <= 1  # the last token is evaluated again for its logits; nothing more
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", *SHORT, *with_servers(again))
    assert code == 0, err
    assert again.prompt_tokens() < 100  # the other prelude came from its slot file too


# ----- the OpenAI-compatible path and errors ---------------------------------------------------------


def test_the_openai_path_against_llama_servers_v1_completions(cli, workspace: Path, llama_servers,
                                                               tmp_path: Path) -> None:
    server = llama_servers()
    with open_server_backend(tmp_path, server) as backend:
        n_ctx = backend.n_ctx  # from /props
    with open_server_backend(tmp_path, server, server_api="openai") as backend:
        assert backend.kind.value == "openai"
        assert backend.n_ctx == n_ctx  # llama-server's /v1/models says it too
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "2", *SHORT, *with_servers(server, api="openai"))
    assert code == 0, err
    assert len(outputs(workspace)) == 6
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", *SHORT, *with_servers(server, api="openai"))
    assert code == 0 and len(outputs(workspace)) == 9


def test_structured_outputs_on_a_server_parse_and_validate_through_both_apis(cli, workspace: Path, llama_servers,
                                                                            tmp_path: Path) -> None:
    """A schema sidecar (sent as json_schema) and a grammar sidecar (sent as grammar), on
    llama-server's /completion and on its /v1/completions; and the REPL's json_schema / grammar."""
    from .test_method import SCHEMA, valid

    server = llama_servers()
    write(workspace / "test_prompts" / "dictionary---river.schema.json", json.dumps(SCHEMA))
    write(workspace / "test_prompts" / "dictionary---library.gbnf", 'root ::= "yes" | "no" | "maybe"')
    for api in ("llama", "openai"):
        code, _, err = cli(workspace, "outputs-test-prompts", "-n", "3", "-f", "--max-tokens", "48",
                           *with_servers(server, api=api))
        assert code == 0, err
        made = outputs(workspace)
        rivers = [made[f"dictionary---river.output-{k}.txt"] for k in range(3)]
        assert all(valid(text) for text in rivers), (api, rivers)
        assert {made[f"dictionary---library.output-{k}.txt"] for k in range(3)} <= {"yes", "no", "maybe"}, api
        assert not any(valid_json(made[f"dictionary-long---umbrella.output-{k}.txt"]) for k in range(3))

    with open_server_backend(tmp_path, server) as backend:
        session = Session(backend, SamplingOptions(max_tokens=48))
        for constraint in ({"json_schema": SCHEMA}, {"grammar": 'root ::= [0-9] [0-9]'}):
            response = session.handle_request(json.dumps({"command": "single_prompt", "arguments": {
                "prelude_id": "d", "prelude": CHATML_SYSTEM, "prompt": prompt_for("river"),
                "number_of_random_outputs": 2, **constraint}}))
            assert response["status"] == "Ok", response["message"]
            texts = response["value"]
            assert all(valid(t) for t in texts) if "json_schema" in constraint else all(
                len(t) == 2 and t.isdigit() for t in texts), texts


def valid_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_a_servers_4xx_message_is_passed_on(cli, workspace: Path, llama_servers) -> None:
    server = llama_servers(parallel=2)
    # Five outputs in one request on a server with two slots: llama-server refuses it.
    code, _, err = cli(workspace, "outputs-for-drafts", "-n", "5", *SHORT, *with_servers(server),
                       "--server-parallel", "5")
    assert code == 1
    assert f"{server.url}/completion refused the request with HTTP 400" in err
    assert "n_cmpl" in err  # the server's own words


def test_a_server_context_smaller_than_prelude_and_prompt(cli, workspace: Path, llama_servers) -> None:
    server = llama_servers(ctx=256, parallel=1)  # llama.cpp's smallest context
    write(workspace / "test_prompts" / "dictionary---long.txt", prompt_for("word " * 300))
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "1", *SHORT, *with_servers(server))
    assert code == 1
    assert "skipped dictionary---long.txt" in err and "the context only 256" in err and "n_ctx is 256" in err
    assert len(outputs(workspace)) == 3  # the others are done


def test_an_unreachable_server_is_named(cli, workspace: Path, tmp_path: Path) -> None:
    from .server_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli(workspace, "precache-preludes", "--server", url, "--server-timeout", "5")
    assert code == 1 and f"{url} cannot be reached" in err
    with pytest.raises(ServerDownError, match="no server can be used"):
        ServerBackend(ServerOptions(servers=[url]), None, fallback_n_ctx=64)
    with pytest.raises(ServerError, match="no server given"):
        ServerBackend(ServerOptions(servers=[]), None, fallback_n_ctx=64)


def test_local_engine_flags_given_with_servers_are_named_as_unused(cli, workspace: Path) -> None:
    from .server_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli(workspace, "precache-preludes", "--server", url, "--server-timeout", "5",
                       "--kv-type", "q8_0-keys", "--n_threads", "1", "--lp-n-ctx", "2048")
    assert code == 1  # nothing listens there
    warning = next(line for line in err.splitlines() if "set the local engine only" in line)
    assert "the servers use their own settings" in warning
    named = warning.split(" set the local engine only")[0]
    assert "--kv-type" in named and "--n_threads" in named
    assert "--lp-n-ctx" not in named  # n_ctx is the servers' fallback
