"""Bounds on a GBNF grammar, checked before llama.cpp's grammar parser sees it.

llama.cpp parses and initialises a grammar with recursive C++ functions, so some grammars of
modest size exhaust the C stack and kill the process (SIGSEGV), they do not fail:
  - nested groups: `root ::= ((((...))))` recurses once per level in the parser; 20,000 levels
    (40 KB of text) crash, 10,000 do not (on an 8 MB stack);
  - chains of rules that start with a reference to the next (`a ::= b`, `b ::= c`, ...): the
    initial stacks are built by recursing once per link; 100,000 links crash, 55,000 do not.
    Every group is a rule of its own there, so groups count as links too;
  - repetitions `x{m,n}` are written out as copies of `x` (and `{m,n}` of a group that
    repeats again multiplies): a few bytes can ask for billions of elements.

This module measures those three things with one pass over the text (no recursion, so the
check itself cannot overflow) and refuses a grammar well below where llama.cpp fails.
It only measures: whether the grammar is valid GBNF is for llama.cpp to say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cached_prompts.errors import ConstraintError

MAX_NESTING = 500  # levels of ( ... ) groups
MAX_RULES = 20_000  # named rules and groups together: the longest possible chain of links
MAX_EXPANDED = 1_000_000  # elements once every repetition is written out

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SPACE = re.compile(r"[ \t\r\n]+|#[^\n]*")
_BRACES = re.compile(r"\{\s*(\d*)\s*(,?)\s*(\d*)\s*\}")
_DEFINES = re.compile(r"\s*::=")
_UNBOUNDED_EXTRA = 1  # x{m,} is written out as m copies and one x*


@dataclass
class _Frame:
    """A rule's body or an open group: the size of what it has so far."""

    size: int = 0
    last: int = 0  # size of the last atom, which a repetition operator multiplies


@dataclass
class GrammarSize:
    nesting: int = 0
    rules: int = 0
    expanded: int = 0
    _stack: list[_Frame] = field(default_factory=lambda: [_Frame()])


def measure(grammar: str) -> GrammarSize:
    """Nesting depth, rules (named and groups) and written-out size of a GBNF text."""
    size = GrammarSize()
    stack = size._stack
    i, end = 0, len(grammar)
    while i < end:
        char = grammar[i]
        space = _SPACE.match(grammar, i)
        if space:
            i = space.end()
        elif char in "\"[":
            i = _skip_literal(grammar, i, "\"" if char == "\"" else "]")
            _atom(stack[-1], 1)
        elif char == "(":
            stack.append(_Frame())
            size.rules += 1
            size.nesting = max(size.nesting, len(stack) - 1)
            if size.nesting > MAX_NESTING:
                return size  # deep enough to refuse; the rest need not be read
            i += 1
        elif char == ")":
            inner = stack.pop() if len(stack) > 1 else _Frame()
            _atom(stack[-1], inner.size + 1)
            i += 1
        elif char in "*+?":
            _repeat(stack[-1], 2)
            i += 1
        elif char == "{":
            braces = _BRACES.match(grammar, i)
            if braces is None:
                i += 1
                continue
            low, comma, high = braces.groups()
            count = int(high) if high else int(low or 0) + _UNBOUNDED_EXTRA if comma else int(low or 0)
            _repeat(stack[-1], max(count, 1))
            i = braces.end()
        else:
            name = _NAME.match(grammar, i)
            if name is None:
                i += 1  # '|', '.', '<', ... : no size of their own that matters here
                continue
            i = name.end()
            defines = _DEFINES.match(grammar, i)
            if defines:  # a new rule begins
                size.expanded += sum(frame.size for frame in stack)
                stack[:] = [_Frame()]
                size.rules += 1
                i = defines.end()
            else:
                _atom(stack[-1], 1)
        if size.expanded > MAX_EXPANDED:
            return size
    size.expanded += sum(frame.size for frame in stack)
    return size


def _atom(frame: _Frame, atom_size: int) -> None:
    frame.size += atom_size
    frame.last = atom_size


def _repeat(frame: _Frame, times: int) -> None:
    frame.size += frame.last * (times - 1)
    frame.last *= times


def _skip_literal(text: str, start: int, closing: str) -> int:
    """The index after a "string" or [class] starting at `start` (backslash escapes)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == closing:
            return i + 1
        i += 1
    return len(text)


def check_grammar_size(grammar: str, source: str) -> None:
    """ConstraintError if `grammar` is nested, chained or repeated beyond what llama.cpp takes safely."""
    size = measure(grammar)
    if size.nesting > MAX_NESTING:
        raise ConstraintError(f"{source}: the grammar nests groups ( ... ) more than {MAX_NESTING} levels "
                              "deep, which would overflow llama.cpp's parser; use named rules instead")
    if size.rules > MAX_RULES:
        raise ConstraintError(f"{source}: the grammar has {size.rules} rules and groups, more than "
                              f"{MAX_RULES}; llama.cpp follows chains of them recursively, so simplify it")
    if size.expanded > MAX_EXPANDED:
        raise ConstraintError(f"{source}: the grammar's repetitions ({{m,n}}, nested) write out more than "
                              f"{MAX_EXPANDED} elements; lower the counts")
