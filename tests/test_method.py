"""The seed's method as commands: promote, score-preludes, structured outputs,
the batching REPL and init — on the real default model, with short answers."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cached_prompts.method.chat_format import FORMATS, ChatFormatKind, answer_spans, detect, markers_of
from cached_prompts.errors import ConstraintError
from cached_prompts.local.backend import LocalBackend
from cached_prompts.options import SamplingOptions
from cached_prompts.repl.session import Session
from cached_prompts.method.scoring import score_prelude, scores_path
from cached_prompts.method.constraints import checked_grammar, grammar_from_schema

from .conftest import CHATML_SYSTEM, PRELUDE, age_tree, generate, prompt_for, write

OUTPUTS = "test_prompts_outputs"
SCHEMA = {"type": "object", "properties": {"noun": {"type": "boolean"},
                                           "kind": {"enum": ["thing", "place", "idea"]}},
          "required": ["noun", "kind"], "additionalProperties": False}
REPO = Path(__file__).resolve().parent.parent


def valid(text: str) -> bool:
    """Whether `text` is JSON matching SCHEMA (checked by hand: no jsonschema dependency)."""
    value = json.loads(text)
    return (isinstance(value, dict) and set(value) == {"noun", "kind"} and isinstance(value["noun"], bool)
            and value["kind"] in ("thing", "place", "idea"))


def request(**arguments: Any) -> str:
    return json.dumps({"command": "single_prompt", "arguments": arguments}, ensure_ascii=False)


# ----- chat formats (no model) -----------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ChatFormatKind))
def test_each_format_finds_back_the_answers_it_writes(kind: ChatFormatKind) -> None:
    chat = FORMATS[kind]
    exchanges = [("apple", "A round fruit."), ("robot", "A machine\nthat works.")]
    prelude = chat.conversation("Define words.", exchanges, None)
    assert detect(prelude) == chat
    spans = answer_spans(prelude, markers_of(chat))
    assert [prelude[s:e] for s, e in spans] == ["A round fruit.", "A machine\nthat works."]
    assert prelude.endswith(chat.user_open)
    draft = chat.conversation("Define words.", exchanges[:1], "pear")
    assert answer_spans(draft, markers_of(chat)) == spans[:1], "an open answer is no example"
    assert draft.startswith(chat.conversation("Define words.", exchanges[:1], None)), "promote's text + a prompt"


def test_next_turn_openings() -> None:
    assert FORMATS[ChatFormatKind.CHATML].next_turn == "<|im_end|>\n<|im_start|>user\n"
    assert FORMATS[ChatFormatKind.LLAMA3].next_turn == "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    assert FORMATS[ChatFormatKind.GEMMA].next_turn == "<end_of_turn>\n<start_of_turn>user\n"
    assert FORMATS[ChatFormatKind.MISTRAL].next_turn == "</s>[INST] "
    assert FORMATS[ChatFormatKind.PLAIN].next_turn == "\nuser\n"
    assert detect("user\n2+2=\nbot\n") == FORMATS[ChatFormatKind.PLAIN]
    assert detect("a robot\nis here") is None


# ----- promote ---------------------------------------------------------------------------------


def test_promote_writes_draft_output_and_next_turn_and_refuses_to_overwrite(cli, workspace: Path) -> None:
    code, _, _ = cli(workspace, "outputs-for-drafts", "-n", "2", "--max-tokens", "6")
    assert code == 0
    draft = (workspace / "prelude_drafts" / "dictionary.txt").read_text("utf-8")
    answer = (workspace / "prelude_drafts_outputs" / "dictionary.output-1.txt").read_text("utf-8")
    code, out, err = cli(workspace, "promote", "dictionary", "1", "--as", "promoted")
    assert code == 0, err
    assert out.strip() == "preludes/promoted.txt"
    promoted = workspace / "preludes" / "promoted.txt"
    assert promoted.read_text("utf-8") == draft + answer + "<|im_end|>\n<|im_start|>user\n"

    promoted.write_text("mine", encoding="utf-8")
    code, _, err = cli(workspace, "promote", "dictionary.txt", "0", "--as", "promoted")
    assert code == 1 and "preludes/promoted.txt already exists; pass -f" in err
    assert promoted.read_text("utf-8") == "mine"

    # -f replaces a link planted there, never the file it points to
    target = workspace / "elsewhere.txt"
    target.write_text("keep", encoding="utf-8")
    promoted.unlink()
    promoted.symlink_to(target)
    code, _, err = cli(workspace, "promote", "dictionary", "0", "--as", "promoted", "-f",
                       "--next-turn", "\nQ: ")
    assert code == 0, err
    assert not promoted.is_symlink() and target.read_text("utf-8") == "keep"
    zero = (workspace / "prelude_drafts_outputs" / "dictionary.output-0.txt").read_text("utf-8")
    assert promoted.read_text("utf-8") == draft + zero + "\nQ: "


def test_promote_explains_what_is_missing(cli, workspace: Path) -> None:
    code, _, err = cli(workspace, "promote", "dictionary", "3")
    assert code == 1 and "prelude_drafts_outputs/dictionary.output-3.txt does not exist" in err
    assert "outputs-for-drafts (-n 4 or more)" in err
    code, _, err = cli(workspace, "promote", "nothing", "0")
    assert code == 1 and "no draft prelude_drafts/nothing.txt; the drafts are: dictionary" in err
    write(workspace / "prelude_drafts" / "plain.txt", "Answer briefly.\n")
    write(workspace / "prelude_drafts_outputs" / "plain.output-0.txt", "ok")
    code, _, err = cli(workspace, "promote", "plain", "0")
    assert code == 1 and "--next-turn" in err
    code, _, err = cli(workspace, "promote", "plain", "0", "--as", "a---b")
    assert code == 1 and "'---'" in err


def test_promote_in_the_seeds_plain_format(cli, workspace: Path) -> None:
    write(workspace / "prelude_drafts" / "sums.txt", "user\n2+2=\nbot\n")
    write(workspace / "prelude_drafts_outputs" / "sums.output-0.txt", "4")
    code, _, err = cli(workspace, "promote", "sums", "0")
    assert code == 0, err
    assert (workspace / "preludes" / "sums.txt").read_text("utf-8") == "user\n2+2=\nbot\n4\nuser\n"


# ----- score-preludes --------------------------------------------------------------------------


def test_the_models_own_answer_scores_above_a_shuffled_copy(cli, workspace: Path, make_runner) -> None:
    backend = make_runner(None)
    greedy = SamplingOptions(temperature=0.0, max_tokens=16)
    own = {}
    for word in ("river", "library"):
        full = backend.tokenize(CHATML_SYSTEM + prompt_for(word), at_start=True)
        own[word] = generate(backend, backend.tokenize(CHATML_SYSTEM, at_start=True), full, greedy, [None],
                             store=False)[0].strip()
    words = own["library"].split()
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != words
    write(workspace / "preludes" / "judge.txt", CHATML_SYSTEM + prompt_for("river") + own["river"]
          + "<|im_end|>\n<|im_start|>user\n" + prompt_for("library") + " ".join(shuffled)
          + "<|im_end|>\n<|im_start|>user\n")

    code, out, err = cli(workspace, "score-preludes", "--json")
    assert code == 0, err
    scores = {entry["prelude"]: entry for entry in json.loads(out)}
    assert sorted(scores) == ["dictionary-long.txt", "dictionary.txt", "judge.txt"]
    judge = scores["judge.txt"]
    assert set(judge) == {"prelude", "tokens", "mean_logprob", "answers"}
    assert judge["tokens"] == backend.count_tokens((workspace / "preludes" / "judge.txt").read_text("utf-8"),
                                                   at_start=True)
    mine, mixed = judge["answers"]
    assert set(mine) == {"index", "tokens", "mean_logprob", "perplexity", "text"}
    assert (mine["index"], mixed["index"]) == (0, 1)
    assert mine["text"] == own["river"][:60]
    assert mine["mean_logprob"] > mixed["mean_logprob"]
    assert mine["perplexity"] < mixed["perplexity"]
    assert len(scores["dictionary-long.txt"]["answers"]) == 2

    code, out, _ = cli(workspace, "score-preludes")
    table = out.split("preludes/judge.txt")[1].split("\n\n")[0].splitlines()
    assert table[1].split()[:2] == ["#", "tokens"]
    assert [row.split()[0] for row in table[2:]] == ["1", "0"], "the weakest example comes first"
    saved = json.loads(scores_path_of(workspace).read_text("utf-8"))
    spans = saved["preludes"]["judge.txt"]["answers"][0]["token_logprobs"]
    text = (workspace / "preludes" / "judge.txt").read_text("utf-8")
    assert "".join(text[start:end] for start, end, _ in spans).strip() == own["river"]


def scores_path_of(root: Path) -> Path:
    from cached_prompts.workspace.layout import Workspace

    return scores_path(Workspace(root))


def test_scores_are_those_of_one_pass_over_the_whole_prelude(workspace: Path, make_runner) -> None:
    """From a cached state or computed, the numbers are those of decoding the prelude in one
    go on an empty context (the KV layout changes llama.cpp's sums noticeably)."""
    import numpy as np

    from cached_prompts.method.scoring import token_offsets

    path = workspace / "preludes" / "dictionary-long.txt"
    cached = make_runner(workspace / "llm_cache")
    first = score_prelude(cached, path, None)
    again = score_prelude(cached, path, None)  # the state now comes from the cache
    bare = make_runner(None)
    tokens = bare.prelude_tokens(path.read_text("utf-8"), "x")
    bare.context.decode_sequence(tokens, 0, 0, all_logits=True)  # the reference: one decode
    logits = bare.context.logits(len(tokens)).astype(np.float64)
    log_sum = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    offsets = token_offsets(bare.token_pieces(tokens), path.read_text("utf-8"))
    for answer, repeated in zip(first.answers, again.answers):
        ids = [i for i in range(1, len(tokens)) if answer.start <= offsets[i][0] < answer.end]
        reference = [logits[i - 1, tokens[i]] - log_sum[i - 1] for i in ids]
        assert answer.logprobs == repeated.logprobs
        assert answer.logprobs == pytest.approx(reference, abs=2e-3)


def earlier_token_logprobs(backend: LocalBackend, tokens: list[int], first: int, end: int) -> list[float]:
    """What score-preludes computed before Backend.token_logprobs existed (its code, on an
    empty context): tokens[:first-1] decoded in n_batch chunks, then tokens[first-1:end-1]
    with logits for every row, and the log-softmax taken in numpy."""
    import llama_cpp
    import numpy as np

    context, n_vocab, start, last = backend.context, backend.model.n_vocab, first - 1, end - 1
    backend.unload()
    for chunk in range(0, start, context.n_batch):
        context.decode_sequence(tokens[chunk:min(chunk + context.n_batch, start)], chunk, 0)
    result = []
    for chunk in range(start, last, context.n_batch):
        rows = tokens[chunk:min(chunk + context.n_batch, last)]
        context.decode_sequence(rows, chunk, 0, all_logits=True)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(context.handle), shape=(len(rows), n_vocab))
        peak = logits.max(axis=1)
        log_sum = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64))
        chosen = logits[np.arange(len(rows)), np.array(tokens[chunk + 1:chunk + 1 + len(rows)])]
        result += [float(value) for value in chosen - log_sum]
    backend.unload()
    return result


def test_token_logprobs_give_the_numbers_scoring_gave_before(workspace: Path, make_runner) -> None:
    """Backend.token_logprobs, from a computed and from a cached prelude state, with chunks
    smaller than the prelude, is bitwise what score-preludes computed itself before."""
    text = (workspace / "preludes" / "dictionary-long.txt").read_text("utf-8")
    cached = make_runner(workspace / "llm_cache", n_batch=10)
    tokens = cached.prelude_tokens(text, "x")
    first, end = len(tokens) // 3, len(tokens) - 2
    assert first > 2 * 10 and end - first > 2 * 10  # several chunks before and with logits
    computed = cached.token_logprobs(tokens, first, end, "dictionary-long")
    restored = cached.token_logprobs(tokens, first, end, "dictionary-long")
    assert cached.counters.sources == ["computed", "cache"]
    reference = earlier_token_logprobs(make_runner(None, n_batch=10), tokens, first, end)
    assert len(computed) == end - first
    assert computed == restored == reference
    assert all(value < 0 for value in computed)


def test_the_report_shows_the_scores_as_a_heat_map(cli, workspace: Path) -> None:
    code, _, err = cli(workspace, "score-preludes")
    assert code == 0, err
    code, _, err = cli(workspace, "report")
    assert code == 0, err
    page = (workspace / "report.html").read_text("utf-8")
    assert page.count('class="source heat"') == 2 and 'data-scores="2"' in page
    assert page.count('<span class="tok"') > 20 and 'title="log p -' in page
    write(workspace / "preludes" / "dictionary.txt", PRELUDE.replace("crisp", "crunchy"))
    cli(workspace, "report")
    page = (workspace / "report.html").read_text("utf-8")
    assert page.count('class="source heat"') == 1, "scores of an older text are not shown"


def test_score_preludes_without_a_chat_format_needs_markers(cli, workspace: Path) -> None:
    write(workspace / "preludes" / "qa.txt", "Q: sky?\nA: Blue.\nQ: grass?\nA: Green.\nQ: ")
    code, out, _ = cli(workspace, "score-preludes")
    assert "preludes/qa.txt" in out and "--answer-marker" in out
    code, out, err = cli(workspace, "score-preludes", "--json", "--answer-marker", "A: ")
    assert code == 0, err
    qa = next(e for e in json.loads(out) if e["prelude"] == "qa.txt")
    assert [a["text"] for a in qa["answers"]] == ["Blue.", "Green."]


# ----- structured outputs ----------------------------------------------------------------------


def test_every_output_of_a_schema_sidecar_parses_and_validates(cli, workspace: Path) -> None:
    write(workspace / "test_prompts" / "dictionary---river.schema.json", json.dumps(SCHEMA))
    write(workspace / "prelude_drafts" / "dictionary.gbnf", 'root ::= ("yes" | "no") "."\n')
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "3", "--max-tokens", "48")
    assert code == 0, err
    river = sorted((workspace / OUTPUTS).glob("dictionary---river.output-*.txt"))
    assert len(river) == 3 and all(valid(p.read_text("utf-8")) for p in river)
    library = (workspace / OUTPUTS / "dictionary---library.output-0.txt").read_text("utf-8")
    assert not library.lstrip().startswith("{"), "the sidecar constrains only its own prompt"
    code, _, err = cli(workspace, "outputs-for-drafts", "-n", "2", "--max-tokens", "4")
    assert code == 0, err
    drafts = [p.read_text("utf-8") for p in sorted((workspace / "prelude_drafts_outputs").glob("*.txt"))]
    assert sorted(set(drafts)) <= ["no.", "yes."] and len(drafts) == 2
    # with -d as well: the greedy output follows the schema
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "48")
    assert valid((workspace / OUTPUTS / "dictionary---river.output-deterministic.txt").read_text("utf-8"))


def test_a_sidecar_is_an_input_of_freshness(cli, workspace: Path) -> None:
    assert cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "24")[0] == 0
    age_tree(workspace)
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "24")
    assert code == 0 and "3 up to date" in err
    write(workspace / "test_prompts" / "dictionary---river.schema.json", json.dumps(SCHEMA))
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "24")
    assert code == 0 and "outputs: 1 written" in err
    assert valid((workspace / OUTPUTS / "dictionary---river.output-0.txt").read_text("utf-8"))


BAD_SIDECARS = [
    (".gbnf", "root ::= missing", "Undefined rule identifier 'missing'"),
    (".gbnf", "", "is empty"),
    (".schema.json", "{not json", "is not valid JSON"),
    (".schema.json", '{"type": "array", "maxItems": 1000000}', '"maxItems": 1000000'),
    (".schema.json", '{"$ref": "https://example.com/s.json"}', "nothing is fetched"),
    (".schema.json", '{"type": "number", "x": NaN}', "contains NaN"),
    (".schema.json", "[1, 2]", "a JSON schema is an object"),
    (".schema.json", b"\xff{}", "is not UTF-8"),
]


def test_a_bad_sidecar_skips_its_prompt_with_a_clear_error(cli, workspace: Path) -> None:
    for number, (suffix, content, _) in enumerate(BAD_SIDECARS):
        write(workspace / "test_prompts" / f"dictionary---bad{number}.txt", prompt_for("word"))
        sidecar = workspace / "test_prompts" / f"dictionary---bad{number}{suffix}"
        sidecar.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "2")
    assert code == 1
    for number, (suffix, _, expected) in enumerate(BAD_SIDECARS):
        message = next(line for line in err.splitlines() if f"skipped dictionary---bad{number}.txt" in line)
        assert f"test_prompts/dictionary---bad{number}{suffix}" in message and expected in message
    done = sorted(p.name for p in (workspace / OUTPUTS).glob("*.txt"))
    assert done == ["dictionary---library.output-0.txt", "dictionary---river.output-0.txt",
                    "dictionary-long---umbrella.output-0.txt"]


def test_sidecars_that_are_links_or_doubled_are_refused(cli, workspace: Path) -> None:
    outside = workspace.parent / "schema.json"
    outside.write_text(json.dumps(SCHEMA), encoding="utf-8")
    (workspace / "test_prompts" / "dictionary---river.schema.json").symlink_to(outside)
    write(workspace / "test_prompts" / "dictionary---library.schema.json", "{}")
    write(workspace / "test_prompts" / "dictionary---library.gbnf", 'root ::= "x"')
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "1", "--max-tokens", "2")
    assert code == 1
    assert "dictionary---river.schema.json is a symbolic link, not a file" in err
    assert "has both dictionary---library.schema.json and dictionary---library.gbnf" in err


def test_malformed_grammars_are_errors_never_crashes(make_runner) -> None:
    backend = make_runner(None)
    for grammar in ("root ::= [", 'root ::= root "a"', 'x ::= "a"', 'root ::= "\\xff', "root ::= (((("):
        with pytest.raises(ConstraintError, match="llama.cpp cannot use the grammar"):
            checked_grammar(grammar, "g", backend)
    for schema in ({"type": "strin"}, {"type": "string", "pattern": "(a"}, {"$ref": "#/nowhere"},
                   {"type": "string", "pattern": "a{5000}"}):
        with pytest.raises(ConstraintError):
            grammar_from_schema(schema, "s", backend)
    assert checked_grammar('root ::= "a"', "g", backend) == 'root ::= "a"'


# ----- the REPL: json_schema, grammar, prompts, --batch-waiting --------------------------------


@pytest.fixture
def workspace_session(cli_backend: Callable[[Path], LocalBackend], workspace: Path) -> Session:
    """A REPL session on the workspace's cache, with the backend the `cli` fixture builds."""
    return Session(cli_backend(workspace), SamplingOptions(max_tokens=6))


def answer(session: Session, line: str) -> Any:
    response = session.handle_request(line)
    assert response["status"] == "Ok", response["message"]
    return response["value"]


def test_repl_outputs_follow_a_json_schema_or_grammar(workspace_session: Session) -> None:
    outputs = answer(workspace_session, request(prelude_id="d", prelude=PRELUDE, prompt=prompt_for("river"),
                                      number_of_random_outputs=3, add_nonrandom_output_to_front=True,
                                      json_schema=SCHEMA, inference_parameters={"max_tokens": 48}))
    assert len(outputs) == 4 and all(valid(text) for text in outputs)
    outputs = answer(workspace_session, request(prelude_id="d", prelude=PRELUDE, prompts=[prompt_for("a"), prompt_for("b")],
                                      number_of_random_outputs=2, grammar='root ::= [0-9] [0-9]'))
    assert all(len(text) == 2 and text.isdigit() for texts in outputs for text in texts)
    bad = workspace_session.handle_request(request(prelude_id="d", prelude=PRELUDE, prompt="x", grammar="root ::= y"))
    assert bad["status"] == "SystemError" and "Undefined rule identifier 'y'" in bad["message"]
    both = workspace_session.handle_request(request(prelude_id="d", prelude=PRELUDE, prompt="x", grammar='root ::= "a"',
                                          json_schema={}))
    assert "give 'json_schema' or 'grammar', not both" in both["message"]


def test_a_prompts_request_matches_outputs_test_prompts(cli, workspace: Path, workspace_session: Session) -> None:
    words = ("library", "river")  # outputs-test-prompts takes them in file-name order
    code, _, err = cli(workspace, "outputs-test-prompts", "-n", "3", "--max-tokens", "6", "--seed", "5")
    assert code == 0, err
    files = [[(workspace / OUTPUTS / f"dictionary---{w}.output-{k}.txt").read_text("utf-8") for k in range(3)]
             for w in words]
    line = request(prelude_id="dictionary", prelude=PRELUDE, prompts=[prompt_for(w) for w in words],
                   number_of_random_outputs=3, inference_parameters={"seed": 5})
    assert answer(workspace_session, line) == files
    assert answer(workspace_session, line) == files, "the same request gives the same outputs"


def test_prompts_are_checked(workspace_session: Session) -> None:
    for arguments, expected in [({"prompts": []}, "at least 1 item"),
                                ({"prompts": ["a", 3]}, "'prompts.1'"),
                                ({"prompt": "a", "prompts": ["b"]}, "not both"),
                                ({}, "missing required argument 'prompt' (or 'prompts'"),
                                ({"prompts": ["a"] * 20, "number_of_random_outputs": 20}, "more than 256")]:
        response = workspace_session.handle_request(request(prelude_id="d", prelude=PRELUDE, **arguments))
        assert response["status"] == "SystemError" and expected in response["message"]


def test_batch_waiting_decodes_waiting_lines_together_and_answers_each(tmp_path: Path) -> None:
    common = {"prelude_id": "dict", "prelude": PRELUDE, "number_of_random_outputs": 2}

    def line(request_id: Any, **arguments: Any) -> str:
        return json.dumps({"id": request_id, "command": "single_prompt", "arguments": {**common, **arguments}})

    lines = [line(0, prompt=prompt_for("river")), line(1, prompt=prompt_for("library")),
             '{id: "i", command: "info"}',  # ends the run of batched lines
             line(3, prompts=[prompt_for("river"), prompt_for("library")]),
             '{id: "bad", command: "single_prompt", arguments: {prelude_id: "dict"}}',
             line(5, prompt=prompt_for("umbrella")), line(6, prompt="x", inference_parameters={"seed": 1}),
             '{id: "end", command: "info"}']
    stdin = tmp_path / "requests.jsonl"  # a file: every line is waiting from the start
    stdin.write_text("\n".join(lines) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "cached_prompts", "--root", str(tmp_path), "--lp-n-ctx", "1024",
               "--lp-n-batch", "256", "--max-tokens", "5", "stdio-json-repl", "--batch-waiting"]
    with stdin.open("rb") as requests:
        done = subprocess.run(command, stdin=requests, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    responses = [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]
    assert [r.get("id") for r in responses] == [0, 1, "i", 3, "bad", 5, 6, "end"]
    assert [r["status"] for r in responses] == ["Ok", "Ok", "Ok", "Ok", "SystemError", "Ok", "Ok", "Ok"]
    # lines 0 and 1 were decoded as one request: exactly what one `prompts` request gives
    assert responses[2]["value"]["counters"]["requests_batched"] == 2
    assert [responses[0]["value"], responses[1]["value"]] == responses[3]["value"]
    # 5 and 6 differ in sampling options: each alone
    assert len(responses[5]["value"]) == 2 and len(responses[6]["value"]) == 2
    assert responses[-1]["value"]["counters"]["requests_batched"] == 2


# ----- init ------------------------------------------------------------------------------------


def test_init_makes_a_workspace_in_the_models_chat_format(cli, tmp_path: Path) -> None:
    root = tmp_path / "new" / "ws"
    code, out, err = cli(tmp_path, "init", str(root))
    assert code == 0, err
    for folder in ("prelude_drafts", "prelude_drafts_outputs", "preludes", "test_prompts",
                   "test_prompts_outputs", "llm_cache", "models"):
        assert (root / folder).is_dir()
    assert (root / "cached-prompts.toml").is_file()
    prelude = (root / "preludes" / "dictionary.txt").read_text("utf-8")
    draft = (root / "prelude_drafts" / "dictionary.txt").read_text("utf-8")
    prompt = (root / "test_prompts" / "dictionary---river.txt").read_text("utf-8")
    assert prelude.startswith("<|im_start|>system\n") and prelude.endswith("<|im_end|>\n<|im_start|>user\n")
    assert draft.endswith("apple<|im_end|>\n<|im_start|>assistant\n")
    assert prompt == "river<|im_end|>\n<|im_start|>assistant\n"
    (root / "preludes" / "dictionary.txt").write_text("mine", encoding="utf-8")
    code, out, _ = cli(tmp_path, "init", str(root))
    assert code == 0 and out == "" and (root / "preludes" / "dictionary.txt").read_text("utf-8") == "mine"
    code, _, err = cli(root, "outputs-test-prompts", "-n", "1", "--max-tokens", "2")
    assert code == 0, err


def test_init_reads_the_format_of_another_model(cli, tmp_path: Path) -> None:
    from .model_fixtures import gemma3_270m_or_missing

    code, _, err = cli(tmp_path, "init", str(tmp_path / "g"), "--lp-model-path", str(gemma3_270m_or_missing()))
    assert code == 0, err
    prelude = (tmp_path / "g" / "preludes" / "dictionary.txt").read_text("utf-8")
    assert prelude.startswith("<start_of_turn>user\n") and prelude.endswith("<end_of_turn>\n<start_of_turn>user\n")
    assert "gemma" in (tmp_path / "g" / "cached-prompts.toml").read_text("utf-8")
