"""Structured outputs: a JSON schema or a GBNF grammar that every output of a prompt matches.

A draft or test prompt `NAME.txt` may have a sidecar next to it, `NAME.schema.json` (a JSON
schema) or `NAME.gbnf` (a grammar; where it is and its bytes: workspace/sidecars.py); the REPL's `single_prompt` takes `json_schema` or
`grammar`. A schema becomes GBNF with llama-cpp-python's converter; the grammar then goes to
llama.cpp's grammar sampler (local/sampler.py SamplerChain), which lets only tokens the grammar allows
be sampled. Servers are sent the schema itself, or the grammar (docs/servers-structured.md). The backend checks a grammar before any decoding (`Backend.check_grammar`), so a
bad one is a clear error, never a crash.

Sidecars come from the untrusted workspace: read only if they are regular files (no links),
bounded in size, and a schema is refused if it asks for remote `$ref`s or for repetitions
large enough to blow the grammar up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cached_prompts.backend.interface import Backend, OutputConstraint
from cached_prompts.errors import ConstraintError
from cached_prompts.local.grammar import check_gbnf, schema_to_gbnf
from cached_prompts.local.grammar_limits import check_grammar_size
from cached_prompts.workspace.sidecars import ConstraintKind, read_sidecar, shown, sidecar_of

MAX_GRAMMAR_BYTES = 1 << 20
# minItems, maxLength, {n,m} ... : the converter writes each repetition out, so a huge bound
# would make a huge grammar (and take the memory to build it).
MAX_REPETITION = 1000
MAX_SCHEMA_DEPTH = 100
_REPETITION_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def load_constraint(input_path: Path, backend: Backend) -> OutputConstraint | None:
    """The checked constraint that the outputs of `input_path` must match, or None."""
    sidecar = sidecar_of(input_path)
    if sidecar is None:
        return None
    data = read_sidecar(sidecar)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConstraintError(f"{shown(sidecar)} is not UTF-8 text (bad byte at offset {error.start}); "
                              "save it as UTF-8") from None
    if sidecar.name.endswith(ConstraintKind.SCHEMA.value):
        return schema_constraint(parse_schema(text, shown(sidecar)), shown(sidecar), backend)
    return OutputConstraint(checked_grammar(text, shown(sidecar), backend))


# ----- schemas and grammars --------------------------------------------------------------------


def parse_schema(text: str, source: str) -> Any:
    """The JSON value of a schema file (strict JSON: no NaN, no duplicate keys)."""
    def refuse_constant(name: str) -> Any:
        raise ConstraintError(f"{source} contains {name}, which is not JSON; remove it")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ConstraintError(f"{source}: a key appears twice in one object ({keys}); give each once")
        return dict(pairs)

    try:
        return json.loads(text, parse_constant=refuse_constant, object_pairs_hook=unique)
    except RecursionError:
        raise ConstraintError(f"{source} is nested too deeply to be a schema") from None
    except ValueError as error:
        raise ConstraintError(f"{source} is not valid JSON ({error}); fix the schema") from None


def schema_constraint(schema: Any, source: str, backend: Backend) -> OutputConstraint:
    """A JSON schema's checked grammar, with the schema (for servers)."""
    grammar = grammar_from_schema(schema, source, backend)
    return OutputConstraint(grammar, {} if schema is True else schema)


def grammar_from_schema(schema: Any, source: str, backend: Backend) -> str:
    """The checked GBNF of a JSON schema (an object, or `true` for any JSON value)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError(f"{source}: a JSON schema is an object (e.g. {{\"type\": \"object\", "
                              f"\"properties\": {{...}}}}), not {type(schema).__name__}")
    _check_schema_bounds(schema, source)
    try:
        grammar = schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise ConstraintError(f"{source}: the schema refers to itself too deeply to become a grammar") from None
    except Exception as error:  # the converter signals what it cannot do with assert, KeyError, ...
        reason = str(error) or type(error).__name__
        raise ConstraintError(f"{source}: llama-cpp-python cannot turn this JSON schema into a grammar "
                              f"({reason}); simplify the schema or write a .gbnf grammar instead") from None
    return checked_grammar(grammar, source, backend)


def checked_grammar(grammar: str, source: str, backend: Backend) -> str:
    """`grammar` if the backend can constrain outputs with it; ConstraintError otherwise."""
    if not grammar.strip():
        raise ConstraintError(f"{source} is empty; write a GBNF grammar with a rule named root")
    if len(grammar.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise ConstraintError(f"{source}: the grammar has more than {MAX_GRAMMAR_BYTES} bytes; simplify it")
    if "\0" in grammar:
        raise ConstraintError(f"{source} contains a NUL character; a grammar is text")
    check_grammar_size(grammar, source)  # llama.cpp's parser recurses: deep nesting would crash it
    check_gbnf(grammar, source)  # GBNF as llama.cpp parses it, for servers too
    backend.check_grammar(grammar, source)  # and what this backend can do with it
    return grammar


def _walk(schema: Any) -> Iterator[tuple[str, Any, int]]:
    """(key, value, depth) of every member of every object in the schema."""
    stack: list[tuple[Any, int]] = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            yield str(key), value, depth
            stack.append((value, depth + 1))


def _check_schema_bounds(schema: dict[str, Any], source: str) -> None:
    for key, value, depth in _walk(schema):
        if depth > MAX_SCHEMA_DEPTH:
            raise ConstraintError(f"{source}: the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise ConstraintError(f"{source}: \"$ref\": {value!r} points outside the schema; only local "
                                  "references (\"#/...\") are followed, nothing is fetched")
        if key in _REPETITION_KEYS and isinstance(value, int) and value > MAX_REPETITION:
            raise ConstraintError(f"{source}: \"{key}\": {value} is more than {MAX_REPETITION}; a grammar "
                                  "spells every repetition out, so lower it")
        if key == "pattern" and isinstance(value, str):
            counts = [int(n) for match in _PATTERN_COUNT.finditer(value) for n in match.groups() if n]
            if any(n > MAX_REPETITION for n in counts):
                raise ConstraintError(f"{source}: the pattern {value!r} repeats more than {MAX_REPETITION} "
                                      "times; lower the count")


def constraint_from_request(json_schema: dict[str, Any] | None, grammar: str | None,
                            backend: Backend) -> OutputConstraint | None:
    """The checked constraint of a REPL request's `json_schema` or `grammar` argument, or None."""
    if json_schema is not None:
        return schema_constraint(json_schema, "json_schema", backend)
    if grammar is not None:
        return OutputConstraint(checked_grammar(grammar, "grammar", backend))
    return None
