"""Answers a real llama-server or vLLM cannot be made to send — wrong field types, an answer far
larger than what was asked for — from a canned HTTP server of the test's own on 127.0.0.1
(tests/server_fixtures.py: CannedServer): each is a clear error naming the server and what
it sent, never a traceback, and nothing of it is written. And what each protocol is sent to
constrain outputs (the dialect is chosen when the server is probed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cached_prompts.backend.interface import GenerationRequest, PromptJob, StopReason
from cached_prompts.errors import ConstraintError, ServerError
from cached_prompts.options import SamplingOptions, ServerOptions
from cached_prompts.server.backend import ServerBackend
from cached_prompts.server.openai_api import StructuredDialect
from cached_prompts.workspace.records import read_record

from .server_fixtures import CannedServer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
GRAMMAR = 'root ::= "yes" | "no"'


def outputs_made(root: Path) -> list[str]:
    folder = root / "test_prompts_outputs"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def run_outputs(cli, workspace: Path, server: CannedServer, *flags: str) -> tuple[int, str]:
    code, out, err = cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "8", "--server", server.url,
                         *flags)
    assert out == ""
    assert "Traceback" not in err
    return code, err


def test_a_llama_server_answer_with_a_wrong_field_type_is_named(cli, workspace: Path, canned_server) -> None:
    canned_server.llama_server().answers["/completion"] = (
        200, {"content": "A river.", "tokens_predicted": "abc", "tokens_evaluated": 9}, True)
    code, err = run_outputs(cli, workspace, canned_server)
    assert code == 1
    assert f"{canned_server.url}/completion answered off its protocol" in err
    assert "'tokens_predicted'" in err and "'abc'" in err
    assert outputs_made(workspace) == []


def test_an_openai_answer_with_a_wrong_field_type_is_named(cli, workspace: Path, canned_server) -> None:
    canned_server.answers["/v1/models"] = (200, {"data": [{"id": "canned"}]}, True)
    canned_server.answers["/v1/completions"] = (
        200, {"choices": [{"text": "A river.", "index": 0}], "usage": {"prompt_tokens": 9, "completion_tokens": [1]}},
        True)
    code, err = run_outputs(cli, workspace, canned_server, "--server-api", "openai")
    assert code == 1
    assert f"{canned_server.url}/v1/completions answered off its protocol" in err
    assert "'usage.completion_tokens'" in err and "[1]" in err
    assert outputs_made(workspace) == []


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "streamed"])
def test_an_answer_far_larger_than_max_tokens_is_refused(cli, workspace: Path, canned_server, sized: bool) -> None:
    huge = b'{"content": "' + b"x" * (25 << 20) + b'", "tokens_predicted": 8, "tokens_evaluated": 9}'
    canned_server.llama_server().answers["/completion"] = (200, huge, sized)
    code, err = run_outputs(cli, workspace, canned_server)
    assert code == 1
    said = "announced an answer of" if sized else "sent an answer of more bytes"
    assert f"{canned_server.url}/completion {said}" in err and "an answer to this request can take" in err
    assert outputs_made(workspace) == []


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "streamed"])
def test_a_streamed_answer_far_larger_than_max_tokens_is_refused(cli, workspace: Path, canned_server,
                                                                 sized: bool) -> None:
    """Drafts are not warmed up, so their answer is the first one, streamed (stream: true);
    one line of 25 MB is refused as it arrives, not read whole first."""
    huge = b'data: {"content": "' + b"x" * (25 << 20) + b'", "tokens_predicted": 8, "stop": true}\n\n'
    canned_server.llama_server().answers["/completion"] = (200, huge, sized)
    code, out, err = cli(workspace, "outputs-for-drafts", "-n", "1", "--max-tokens", "8", "--server",
                         canned_server.url)
    assert code == 1 and out == "" and "Traceback" not in err
    assert canned_server.requests["/completion"][0]["stream"] is True
    said = "announced an answer of" if sized else "sent an answer of more bytes"
    assert f"{canned_server.url}/completion {said}" in err
    assert not (workspace / "prelude_drafts_outputs").exists() or not any((workspace / "prelude_drafts_outputs").iterdir())


def test_a_sound_answer_is_written(cli, workspace: Path, canned_server) -> None:
    """The canned server is good enough for a whole run when it answers well (so the tests
    above fail for the reason they name)."""
    canned_server.llama_server().answers["/completion"] = (
        200, {"content": "A river.", "tokens_predicted": 3, "tokens_evaluated": 9, "stop_type": "eos"}, True)
    code, err = run_outputs(cli, workspace, canned_server)
    assert code == 0, err
    assert len(outputs_made(workspace)) == 6  # 3 prompts: an output and its record each
    output = workspace / "test_prompts_outputs" / "dictionary---river.output-0.txt"
    assert output.read_text("utf-8") == "A river."
    record = read_record(output)
    assert record is not None and record.stop_reason is StopReason.END_TOKEN and record.generated_tokens == 3


def test_a_bad_grammar_for_a_server_skips_its_prompt_before_anything_is_sent(cli, workspace: Path,
                                                                           canned_server) -> None:
    """llama.cpp's GBNF parser checks a server's grammar here (no model needed), as the local
    engine checks its own: the prompt is skipped with the reason, the others are made."""
    canned_server.llama_server().answers["/completion"] = (200, {"content": "A river.", "tokens_predicted": 3}, True)
    (workspace / "test_prompts" / "dictionary---river.gbnf").write_text("root ::= foo", encoding="utf-8")
    code, err = run_outputs(cli, workspace, canned_server)
    assert code == 1
    assert "skipped dictionary---river.txt" in err and "Undefined rule identifier 'foo'" in err
    assert len(outputs_made(workspace)) == 4  # the two other prompts: an output and its record each
    assert not any("grammar" in body for body in canned_server.requests["/completion"])


# ----- what is sent to constrain outputs -----------------------------------------------------------


def constrained_body(server: CannedServer, path: str, tmp_path: Path, *, schema: bool, api: str) -> dict:
    """The body of the request that generated one constrained output."""
    with ServerBackend(ServerOptions(servers=[server.url], server_api=api), tmp_path / "cache",
                       fallback_n_ctx=1024) as backend:
        backend.check_grammar(GRAMMAR, "x.gbnf")
        prelude = backend.tokenize("Say yes or no: ", at_start=True)
        job = PromptJob(backend.joint_tokens("Say yes or no: ", "ok?"), [7], GRAMMAR, SCHEMA if schema else None)
        backend.generate(GenerationRequest(prelude, [job], SamplingOptions(max_tokens=4), "p", store=False))
    return server.requests[path][-1]


@pytest.mark.parametrize("schema", [True, False], ids=["schema", "grammar"])
def test_llama_server_is_sent_the_schema_or_the_grammar(canned_server, tmp_path: Path, schema: bool) -> None:
    canned_server.llama_server().answers["/completion"] = (200, {"content": "yes", "tokens_predicted": 1}, True)
    body = constrained_body(canned_server, "/completion", tmp_path, schema=schema, api="auto")
    assert body.get("json_schema") == (SCHEMA if schema else None)
    assert body.get("grammar") == (None if schema else GRAMMAR)


@pytest.mark.parametrize(("version", "dialect"), [("0.11.0", StructuredDialect.VLLM_STRUCTURED),
                                                  ("0.10.2rc1", StructuredDialect.VLLM_STRUCTURED),
                                                  ("0.10.1.1", StructuredDialect.VLLM_GUIDED),
                                                  ("0.6.3.post1", StructuredDialect.VLLM_GUIDED)])
@pytest.mark.parametrize("schema", [True, False], ids=["schema", "grammar"])
def test_vllm_is_sent_the_form_its_version_takes(canned_server, tmp_path: Path, version: str,
                                                 dialect: StructuredDialect, schema: bool) -> None:
    canned_server.answers["/v1/models"] = (200, {"data": [{"id": "canned", "owned_by": "vllm"}]}, True)
    canned_server.answers["/version"] = (200, {"version": version}, True)
    canned_server.answers["/v1/completions"] = (200, {"choices": [{"text": "yes", "index": 0}]}, True)
    body = constrained_body(canned_server, "/v1/completions", tmp_path, schema=schema, api="openai")
    if dialect is StructuredDialect.VLLM_STRUCTURED:
        assert body["structured_outputs"] == ({"json": SCHEMA} if schema else {"grammar": GRAMMAR})
        assert "guided_json" not in body and "guided_grammar" not in body
    else:
        assert body.get("guided_json" if schema else "guided_grammar") == (SCHEMA if schema else GRAMMAR)
        assert "structured_outputs" not in body


def test_an_openai_server_of_unknown_dialect_refuses_constraints(canned_server, tmp_path: Path) -> None:
    """Not vLLM (no /version) nor llama-server: a schema would be ignored there, so it is refused."""
    canned_server.answers["/v1/models"] = (200, {"data": [{"id": "canned"}]}, True)
    with ServerBackend(ServerOptions(servers=[canned_server.url], server_api="openai"), None,
                       fallback_n_ctx=1024) as backend:
        with pytest.raises(ConstraintError, match="cannot constrain outputs"):
            backend.check_grammar(GRAMMAR, "x.gbnf")


def test_a_server_without_props_fields_is_not_taken_for_a_llama_server(canned_server, tmp_path: Path) -> None:
    canned_server.answers["/props"] = (200, {"total_slots": "two"}, True)
    with pytest.raises(ServerError, match=r"/props answered off its protocol.*pass --server-api openai"):
        ServerBackend(ServerOptions(servers=[canned_server.url]), None, fallback_n_ctx=1024)
