"""JSON schema to GBNF, with llama-cpp-python's converter (pure Python, but part of llama_cpp,
which only local/ imports)."""

from __future__ import annotations

from llama_cpp.llama_grammar import json_schema_to_gbnf


def schema_to_gbnf(schema_json: str) -> str:
    """The GBNF grammar (root rule `root`) of a JSON schema given as JSON text. The converter
    signals what it cannot do with assert, KeyError, RecursionError...: callers catch them."""
    return json_schema_to_gbnf(schema_json)
