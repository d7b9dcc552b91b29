"""Grammars without a model: JSON schema to GBNF with llama-cpp-python's converter (pure
Python, but part of llama_cpp, which only local/ imports), and llama.cpp's GBNF parser as a
check of a grammar a server is to be sent (llama-server parses it with the same code; vLLM's
grammar backends take GBNF too)."""

from __future__ import annotations

from llama_cpp.llama_grammar import json_schema_to_gbnf

from cached_prompts.errors import ConstraintError
from cached_prompts.local.sampler import SamplerChain


def schema_to_gbnf(schema_json: str) -> str:
    """The GBNF grammar (root rule `root`) of a JSON schema given as JSON text. The converter
    signals what it cannot do with assert, KeyError, RecursionError...: callers catch them."""
    return json_schema_to_gbnf(schema_json)


def check_gbnf(grammar: str, source: str) -> None:
    """ConstraintError naming `source` and llama.cpp's reason unless its parser takes `grammar`."""
    try:
        SamplerChain.check_grammar(None, grammar)
    except ConstraintError as error:
        raise ConstraintError(f"{source}: {error}") from None
