"""The JSON service (`stdio-json-repl`): protocol, commands, external preludes, robustness.

Most tests call `Session.handle_request` in-process on the real model; the subprocess tests
prove the same through real pipes (and through the example client in examples/)."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import json5
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cached_prompts.options import EngineOptions, SamplingOptions, derive_seed
from cached_prompts.repl.protocol import MAX_LINE_BYTES, encode_response
from cached_prompts.backend.interface import PreludeKind
from cached_prompts.repl.serve import run_loop
from cached_prompts.repl.session import Session
from cached_prompts.local.backend import LocalBackend as Runner

from .conftest import PRELUDE, generate, prompt_for

SPEC_LINE = r'{command: "single_prompt", arguments: {prelude_id: "test_prelude", prelude: "user\n", prompt: "2+2=\nbot\n"}}'
DEFAULTS = SamplingOptions(max_tokens=4)
REPO = Path(__file__).resolve().parent.parent
# One thread: on a small shared machine llama.cpp's spinning threads slow down many times over.
FLAGS = ("--lp-n-ctx", "1024", "--lp-n-batch", "256", "--n_threads", "1", "--max-tokens", "4")


@pytest.fixture
def session(make_runner: Callable[..., Runner], tmp_path: Path) -> Session:
    return Session(make_runner(tmp_path / "ws" / "llm_cache", n_threads=1), DEFAULTS)


def ask(session: Session, line: str | bytes) -> dict[str, Any]:
    response = session.handle_request(line)
    decoded = json.loads(encode_response(response).decode("utf-8"))  # strict JSON, one line
    assert decoded == response
    assert decoded["status"] in ("Ok", "SystemError")
    return response


def request(command: str, **arguments: Any) -> str:
    return json.dumps({"command": command, "arguments": arguments}, ensure_ascii=False)


def ok_value(session: Session, line: str) -> Any:
    response = ask(session, line)
    assert response["status"] == "Ok", response["message"]
    assert response["message"] == ""
    return response["value"]


def error_message(session: Session, line: str | bytes) -> str:
    response = ask(session, line)
    assert response["status"] == "SystemError", response
    assert response["value"] is None and response["message"]
    assert "internal error" not in response["message"]
    return response["message"]


def precache(session: Session, prelude_id: str, text: str) -> dict[str, Any]:
    return ok_value(session, request("precache", prelude_id=prelude_id, prelude=text))


def external_entries(session: Session) -> dict[str, list[list[int]]]:
    found: dict[str, list[list[int]]] = {}
    for entry in session.backend.cache.entries():
        if entry.kind == PreludeKind.EXTERNAL:
            found.setdefault(entry.label, []).append(entry.tokens)
    return found


# ----- the spec's lines and every command ---------------------------------------------------


def test_the_spec_example_line_typed_as_is_answers_ok(session: Session) -> None:
    value = ok_value(session, SPEC_LINE)
    assert isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)


def test_json5_syntax_is_accepted_and_the_id_is_echoed(session: Session) -> None:
    line = "{id: 'req-1', command: 'count_tokens', arguments: {text: 'два слова',}, // comment\n}"
    response = ask(session, line.replace("\n", " ").replace("// comment", "/* comment */"))
    assert response == {"status": "Ok", "value": session.backend.count_tokens("два слова", at_start=False),
                        "message": "", "id": "req-1"}
    assert "id" not in ask(session, '{"command": "info"}')


@pytest.mark.parametrize("line", [r'{command: "count_tokens", arguments: {text: "\ud83d\ude00"}}',
                                  r'{"command": "count_tokens", "arguments": {"text": "\ud83d\ude00"}}'])
def test_an_escaped_surrogate_pair_is_one_character(session: Session, line: str) -> None:
    assert ok_value(session, line) == session.backend.count_tokens("\U0001F600", at_start=False)


def test_count_tokens_counts_bos_only_as_a_prelude(session: Session) -> None:
    as_prompt = ok_value(session, request("count_tokens", text=PRELUDE))
    as_prelude = ok_value(session, request("count_tokens", text=PRELUDE, as_prelude=True))
    assert as_prompt == len(session.backend.tokenize(PRELUDE, at_start=False))
    assert as_prelude == len(session.backend.prelude_tokens(PRELUDE, "test"))


def test_precache_list_and_drop(session: Session) -> None:
    assert precache(session, "dictionary", PRELUDE)["source"] == "computed"
    assert precache(session, "dictionary", PRELUDE)["source"] in ("memory", "cache")
    tokens = len(session.backend.prelude_tokens(PRELUDE, "test"))
    (listed,) = ok_value(session, request("list_preludes"))
    (entry,) = [e for e in session.backend.cache.entries() if e.kind == PreludeKind.EXTERNAL]
    kv_file = session.backend.cache.folder / f"{entry.name}.kv"
    assert listed == {"prelude_id": "dictionary", "tokens": tokens, "bytes": kv_file.stat().st_size}
    assert ok_value(session, request("drop_prelude", prelude_id="dictionary")) == 1
    assert not kv_file.exists()
    assert ok_value(session, request("list_preludes")) == []
    assert ok_value(session, request("drop_prelude", prelude_id="dictionary")) == 0


def test_info_and_shutdown(session: Session) -> None:
    info = ok_value(session, '{command: "info"}')
    assert info["context_length"] == session.backend.n_ctx
    assert info["model_path"].endswith(".gguf") and info["version"] and info["llama_cpp_python_version"]
    assert info["limits"]["max_line_bytes"] == MAX_LINE_BYTES
    assert info["counters"]["preludes_computed"] == 0
    assert not session.finished
    assert ok_value(session, '{command: "shutdown"}') is None
    assert session.finished


# ----- external preludes --------------------------------------------------------------------


def test_second_request_with_the_same_id_does_not_recompute(session: Session) -> None:
    line = request("single_prompt", prelude_id="dict", prelude=PRELUDE, prompt=prompt_for("river"))
    counters = session.backend.counters
    ok_value(session, line)
    assert session.backend.counters.sources[-1] == "computed"
    assert counters.preludes_computed == 1
    computed = counters.prelude_tokens_computed
    ok_value(session, line)
    assert session.backend.counters.sources[-1] == "memory"
    assert (counters.preludes_computed, counters.prelude_tokens_computed) == (1, computed)
    # another prelude in between: the first comes back from the RAM cache, not the disk
    ok_value(session, request("single_prompt", prelude_id="other", prelude="Q: colours\n", prompt="A:"))
    ok_value(session, line)
    assert session.backend.counters.sources[-1] == "cache"
    assert (counters.preludes_computed, session.backend.cache.disk_reads) == (2, 0)


def test_same_id_with_a_new_text_replaces_the_entry(session: Session) -> None:
    first, second = PRELUDE, PRELUDE + "bicycle"
    precache(session, "dict", first)
    precache(session, "dict", second)
    assert external_entries(session) == {"dict": [session.backend.prelude_tokens(second, "t")]}


def test_an_id_gets_its_own_entry_even_when_its_text_is_cached_under_another(session: Session) -> None:
    text_a, text_b = PRELUDE, PRELUDE + "bicycle"
    precache(session, "a", text_a)
    precache(session, "b", text_b)
    assert precache(session, "a", text_b)["source"] in ("memory", "cache")
    tokens_b = session.backend.prelude_tokens(text_b, "t")
    assert external_entries(session) == {"a": [tokens_b], "b": [tokens_b]}
    assert session.backend.counters.preludes_computed == 2


@pytest.mark.parametrize("bad_id", ["../x", "..", ".", "/etc/passwd", "a/b", "a\\b", "C:x", "a\x00b",
                                    "", "x" * 201, " padded", "line\nbreak"])
def test_unsafe_prelude_ids_are_refused(session: Session, bad_id: str, tmp_path: Path) -> None:
    message = error_message(session, request("precache", prelude_id=bad_id, prelude=PRELUDE))
    assert "'prelude_id'" in message and "a prelude_id has 1-200 characters" in message
    assert session.backend.cache.entries(all_settings=True) == []
    assert not list(tmp_path.rglob("*.kv"))


@pytest.mark.parametrize("good_id", ["Большие данные", "x" * 200, "a.b-c_d e", "..x"])
def test_ids_of_any_script_stay_inside_the_cache_folder(session: Session, good_id: str,
                                                        tmp_path: Path) -> None:
    precache(session, good_id, PRELUDE)
    assert [e["prelude_id"] for e in ok_value(session, request("list_preludes"))] == [good_id]
    assert {p.parent for p in tmp_path.rglob("*.kv")} == {session.backend.cache.folder}


# ----- outputs --------------------------------------------------------------------------------


def test_greedy_and_sampled_outputs_match_the_runner(session: Session,
                                                     make_runner: Callable[..., Runner]) -> None:
    params = {"max_tokens": 6, "seed": 3, "stop": ["\n\n"]}
    value = ok_value(session, request("single_prompt", prelude_id="dict", prelude=PRELUDE,
                                      prompt=prompt_for("river"), number_of_random_outputs=2,
                                      add_nonrandom_output_to_front=True, inference_parameters=params))
    uncached = make_runner(None, n_threads=1)
    prelude, prompt = uncached.prelude_tokens(PRELUDE, "t"), uncached.joint_tokens(PRELUDE, prompt_for("river"))
    sampling = DEFAULTS.model_copy(update=params)
    expected = generate(uncached, prelude, prompt, sampling, [None], label="t", store=False)
    expected += generate(uncached, prelude, prompt, sampling, [derive_seed(3, 0), derive_seed(3, 1)],
                                  label="t", store=False)
    assert value == expected
    greedy = ok_value(session, request("single_prompt", prelude_id="dict", prelude=PRELUDE,
                                       prompt=prompt_for("river"),
                                       inference_parameters={"temp": 0, "max_tokens": 6}))
    assert greedy == expected[:1]


# ----- bad requests ---------------------------------------------------------------------------

GOOD = {"prelude_id": "p", "prelude": "Q: 2+2\n", "prompt": "A:"}
BAD_LINES = [
    (b"not json at all", "not valid JSON5"),
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"", "the request line is empty"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{command: "single_prompt", arguments: {prelude_id: "p", prelude: "x"}}',
     "missing required argument 'prompt'"),
    (b'{command: "frobnicate"}', "unknown command 'frobnicate'; valid commands: count_tokens, drop_prelude"),
    (b'{arguments: {}}', "has no 'command'"),
    (b'{command: "info", extra: 1}', "unknown request key(s) 'extra'"),
    (b'{command: "info", arguments: {verbose: true}}', "unknown argument 'verbose'; valid arguments: none"),
    (b'{command: "info", arguments: [1]}', "'arguments' must be an object"),
    (b'{command: "info", command: "shutdown"}', "the key 'command' appears twice"),
    (b'{"command": "info", "command": "shutdown"}', "the key 'command' appears twice"),
    (request("single_prompt", **GOOD, number_of_random_outputs="3").encode(), "'number_of_random_outputs'"),
    (request("single_prompt", **GOOD, number_of_random_outputs=-1).encode(), "'number_of_random_outputs'"),
    (request("single_prompt", **GOOD, number_of_random_outputs=10**12).encode(), "'number_of_random_outputs'"),
    (request("single_prompt", **GOOD, add_nonrandom_output_to_front=1).encode(), "'add_nonrandom_output_to_front'"),
    (request("single_prompt", **GOOD, number_of_random_outputs=0).encode(), "nothing would be generated"),
    (request("single_prompt", **GOOD, inference_parameters={"top_kk": 3}).encode(),
     "unknown inference parameter 'top_kk'; valid inference parameters: frequency_penalty"),
    (request("single_prompt", **GOOD, inference_parameters={"max_tokens": "5"}).encode(), "'max_tokens'"),
    (request("single_prompt", **GOOD, inference_parameters={"max_tokens": 0}).encode(), "'max_tokens'"),
    (request("single_prompt", **GOOD, inference_parameters={"temp": 1, "temperature": 1}).encode(),
     "give only one"),
    (request("single_prompt", **GOOD, inference_parameters=[]).encode(), "'inference_parameters'"),
    (b'{command: "single_prompt", arguments: {prelude_id: "p", prelude: "x", prompt: "y", '
     b'inference_parameters: {temperature: NaN}}}', "only finite numbers"),
    (request("single_prompt", **{**GOOD, "prelude": ""}).encode(), "is empty"),
    (request("single_prompt", **{**GOOD, "prompt": 5}).encode(), "'prompt'"),
    (b'{command: "count_tokens", arguments: {text: "\\ud800"}}', "lone surrogate"),
    (b"[" * 100_000, "nested too deeply"),
    (b"{id: [1], command: 'info'}", "'id' must be"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_bad_lines_get_an_actionable_error(session: Session, line: bytes, expected: str) -> None:
    assert expected in error_message(session, line)


def test_an_error_response_echoes_a_valid_id(session: Session) -> None:
    assert ask(session, '{id: 7, command: "nope"}')["id"] == 7


def test_a_prompt_or_prelude_over_the_context_is_refused_and_the_session_goes_on(session: Session) -> None:
    long_text = "word " * 1500
    message = error_message(session, request("single_prompt", **{**GOOD, "prompt": long_text}))
    assert "context only 1024" in message and "--lp-n-ctx" in message
    message = error_message(session, request("precache", prelude_id="big", prelude=long_text))
    assert "context only 1024" in message
    assert session.backend.counters.preludes_computed == 0
    assert isinstance(ok_value(session, request("single_prompt", **GOOD)), list)


def test_the_loop_answers_every_line_in_order_including_oversized_ones(session: Session) -> None:
    lines = [b'{id: 1, command: "info"}\n',
             b'{"id": 2, "prompt": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n',
             b"x" * (MAX_LINE_BYTES - 1) + b"\n",  # at the limit: parsed (and refused as not JSON5)
             b'{id: 3, command: "count_tokens", arguments: {text: "a"}}']  # no newline before EOF
    out = io.BytesIO()
    assert run_loop(session, io.BytesIO(b"".join(lines)), out) == 0
    responses = [json.loads(line) for line in out.getvalue().decode("utf-8").splitlines()]
    assert [(r["status"], r.get("id")) for r in responses] == [
        ("Ok", 1), ("SystemError", None), ("SystemError", None), ("Ok", 3)]
    assert f"has {len(lines[1])} bytes, the limit is {MAX_LINE_BYTES}" in responses[1]["message"]
    assert "strict JSON" in responses[2]["message"]


# ----- through real processes -------------------------------------------------------------------


def repl_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cached_prompts", "--root", str(root), *FLAGS, *extra, "stdio-json-repl"]


def test_a_mixed_session_through_a_real_process(tmp_path: Path) -> None:
    good = request("single_prompt", prelude_id="dict", prelude=PRELUDE, prompt=prompt_for("river")).encode()
    lines = [SPEC_LINE.encode(), b"{oops", b"42", b'{command: "single_prompt", arguments: {prelude_id: "x"}}',
             b'{command: "nope"}', request("single_prompt", **GOOD, number_of_random_outputs="3").encode(),
             request("single_prompt", **{**GOOD, "prompt": "word " * 1500}).encode(),
             b'{"command": "count_tokens", "arguments": {"text": "' + b"y" * (5 << 20) + b'"}}',
             b"\xc3\x28 invalid UTF-8", good, good, b'{id: "last", command: "info"}']
    # -v: llama.cpp's own log and debug messages go to stderr, never between the responses
    done = subprocess.run(repl_command(tmp_path, "-v"), input=b"\n".join(lines) + b"\n",
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    responses = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert [r["status"] for r in responses] == ["Ok"] + ["SystemError"] * 8 + ["Ok"] * 3
    assert responses[-1]["id"] == "last"
    assert responses[-3] == responses[-2]  # the default seed: the same sampled answer again
    assert responses[-1]["value"]["counters"]["preludes_computed"] == 2  # test_prelude, dict
    assert b"llama" in done.stderr


def load_example_client() -> Any:
    spec = importlib.util.spec_from_file_location("json_client", REPO / "examples" / "json_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_client_and_reuse_from_disk_in_a_new_process(tmp_path: Path) -> None:
    json_client = load_example_client()
    prompt = prompt_for("library")
    with (tmp_path / "stderr.txt").open("wb") as log:
        first = json_client.CachedPromptsClient(tmp_path, *FLAGS, stderr=log)
        answer = first.single_prompt("dict", PRELUDE, prompt, add_nonrandom_output_to_front=True,
                                     number_of_random_outputs=0)
        assert first.info()["counters"]["preludes_computed"] == 1
        with pytest.raises(json_client.ServiceError, match="prelude_id"):
            first.precache("../escape", PRELUDE)
        assert first.close() == 0

        with json_client.CachedPromptsClient(tmp_path, *FLAGS, stderr=log) as second:
            assert second.single_prompt("dict", PRELUDE, prompt, add_nonrandom_output_to_front=True,
                                        number_of_random_outputs=0) == answer
            counters = second.info()["counters"]
            assert counters["preludes_computed"] == 0 and counters["cache_disk_reads"] == 1
            assert [p["prelude_id"] for p in second.list_preludes()] == ["dict"]
            # after shutdown the rest of the input is not read
            assert second.send_line('{command: "shutdown"}')["status"] == "Ok"
            assert second.process.wait(30) == 0


# ----- fuzzing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_session(small_options: EngineOptions, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    runner = Runner(small_options.model_copy(update={"n_threads": 1}),
                    tmp_path_factory.mktemp("fuzz") / "llm_cache", n_parallel=8)
    yield Session(runner, SamplingOptions(max_tokens=2))
    runner.close()


KEYS = st.sampled_from(["command", "arguments", "id", "prelude_id", "prelude", "prompt", "text",
                        "number_of_random_outputs", "add_nonrandom_output_to_front", "as_prelude",
                        "inference_parameters", "temperature", "temp", "seed", "stop", "top_k",
                        "mirostat_mode", "tfs_z", "", "x"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 4), st.sampled_from([10**30, 2**32, "\ud800", "../x"]),
                    st.floats(), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=12)
TEXT = st.text(max_size=20)
ID = st.text(min_size=1, max_size=8)
PARAMETERS = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "seed": st.integers(0, 2**32 - 1), "top_k": st.integers(0, 50),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "max_tokens": st.integers(1, 3),
    "mirostat_mode": st.sampled_from([0, 1, 2]), "tfs_z": st.floats(0, 1)})
# (required, optional) arguments of each command, mostly well-formed so that the fuzzing
# reaches the engine; max_tokens stays tiny so no example runs long.
ARGUMENTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "single_prompt": ({"prelude_id": ID, "prelude": TEXT, "prompt": TEXT},
                      {"number_of_random_outputs": st.integers(0, 3), "add_nonrandom_output_to_front": st.booleans(),
                       "inference_parameters": PARAMETERS}),
    "count_tokens": ({"text": TEXT}, {"as_prelude": st.booleans()}),
    "precache": ({"prelude_id": ID, "prelude": TEXT}, {}),
    "drop_prelude": ({"prelude_id": ID}, {}),
    "list_preludes": ({}, {}), "info": ({}, {}), "shutdown": ({}, {}), "nope": ({}, {}),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    command = draw(st.sampled_from(sorted(ARGUMENTS)))
    required, optional = ARGUMENTS[command]
    arguments = draw(st.fixed_dictionaries(required, optional=optional))
    if arguments and draw(st.integers(0, 9)) == 0:
        del arguments[draw(st.sampled_from(sorted(arguments)))]
    if draw(st.integers(0, 4)) == 0:
        arguments[draw(KEYS)] = draw(VALUES)
    payload: dict[str, Any] = {"command": command, "arguments": arguments}
    if draw(st.booleans()):
        payload["id"] = draw(st.one_of(st.integers(), st.text(max_size=8), VALUES))
    if draw(st.integers(0, 4)) == 0:
        payload[draw(st.sampled_from(["command", "arguments", "extra"]))] = draw(VALUES)
    return payload


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "json5", "mutated", "mutated", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8")
    payload = draw(requests())
    text = json.dumps(payload) if kind == "json" else json5.dumps(payload, quote_keys=False)
    data = bytearray(text.encode("utf-8"))
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            data[at:at + draw(st.integers(0, 3))] = draw(st.binary(max_size=3))
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(line=lines())
def test_fuzzed_lines_always_get_a_well_formed_answer(fuzz_session: Session, line: bytes) -> None:
    response = fuzz_session.handle_request(line)
    assert set(response) <= {"status", "value", "message", "id"}
    assert json.loads(encode_response(response)) == response
    if response["status"] == "SystemError":
        assert response["message"] and response["value"] is None
        assert "internal error" not in response["message"], (line, response)
    else:
        assert response["status"] == "Ok" and response["message"] == ""
    assert fuzz_session.handle_request('{command: "info"}')["status"] == "Ok"
    fuzz_session.finished = False  # a fuzzed shutdown only ends serve()'s loop
