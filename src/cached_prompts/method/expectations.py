"""Expectations: what every output of a test prompt or a draft must satisfy, read from
TOML sidecars (docs/expectations.md).

Where they come from, for a test prompt `test_prompts/P---ID.txt`:
  1. `preludes/P.expect.toml`: for every test prompt of the prelude P;
  2. `test_prompts/P---ID.expect.toml`: the prompt's own. Its checks are added to the
     prelude's; a check with the same `name` as one of the prelude's replaces that one (in
     its place); `replace = true` at its top drops all of the prelude's checks. Its
     `threshold` replaces the prelude's.
A draft `prelude_drafts/D.txt` has only its own `prelude_drafts/D.expect.toml`.

A file:
    threshold = 0.8          # the pass rate the prompt needs (default 1.0)
    replace = false          # a prompt's file only: drop the prelude's checks
    [[expect]]
    name = "six points"      # optional; the default names the check and its value
    items = 6                # exactly one check per [[expect]]

Every value is checked when the file is read: a bad file (not TOML, an unknown key or check,
a value of the wrong type, a regex that does not compile, a schema that is not valid) raises
ExpectationError naming the file and the key, and the input is skipped. Expectations are not
inputs of freshness: changing them re-checks the outputs, it never makes them again.
"""

from __future__ import annotations

import enum
import json
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import regex

from cached_prompts.errors import InputFileError
from cached_prompts.fs.regular import kind_of, read_regular
from cached_prompts.workspace.layout import PRELUDES, Workspace

EXPECT_SUFFIX = ".expect.toml"
MAX_EXPECT_BYTES = 256 * 1024
MAX_SCHEMA_BYTES = 1 << 20
MAX_PATTERN_CHARS = 10_000
DEFAULT_THRESHOLD = 1.0
SHOWN_VALUE_CHARS = 40


class ExpectationError(InputFileError):
    """An expectations file cannot be used; the message names the file and the key."""


class CheckKind(str, enum.Enum):
    EQUALS = "equals"  # the whole output
    STARTS_WITH = "starts_with"
    CONTAINS = "contains"  # a string, or a list: all of them
    CONTAINS_ANY = "contains_any"  # a list: at least one
    NOT_CONTAINS = "not_contains"  # a string, or a list: none of them
    ICONTAINS = "icontains"  # as contains, ignoring case
    REGEX = "regex"  # a match anywhere (regex package syntax; flags inline, e.g. (?m))
    NOT_REGEX = "not_regex"
    LINES = "lines"  # non-empty lines: a number or [min, max]
    ITEMS = "items"  # numbered or bulleted lines: a number or [min, max]
    TOKENS = "tokens"  # generated tokens (from the output's record): [min, max] or a number
    FINISHED = "finished"  # true: ended by the end token or a stop string, not cut by --max-tokens
    IS_JSON = "is_json"  # true: the output (stripped) is one JSON value
    JSON_SCHEMA = "json_schema"  # a schema file (relative to the expectations file) or an inline table


_STRINGS = {CheckKind.EQUALS, CheckKind.STARTS_WITH}
_STRING_LISTS = {CheckKind.CONTAINS, CheckKind.CONTAINS_ANY, CheckKind.NOT_CONTAINS, CheckKind.ICONTAINS}
_PATTERNS = {CheckKind.REGEX, CheckKind.NOT_REGEX}
_RANGES = {CheckKind.LINES, CheckKind.ITEMS, CheckKind.TOKENS}
_FLAGS = {CheckKind.FINISHED, CheckKind.IS_JSON}
_CHECK_KEYS = {kind.value: kind for kind in CheckKind}
_TOP_KEYS = {"expect", "threshold", "replace"}


@dataclass(frozen=True)
class Check:
    """One check: `value` is already validated (str, tuple of str, (min, max), bool, a
    compiled pattern or a JSON-schema validator)."""

    kind: CheckKind
    value: Any
    name: str


@dataclass(frozen=True)
class Expectations:
    """What every output of one input must satisfy; `files` are where it came from."""

    checks: tuple[Check, ...]
    threshold: float
    files: tuple[str, ...]


@dataclass(frozen=True)
class _File:
    checks: tuple[Check, ...]
    threshold: float | None
    replace: bool
    shown: str


def expectations_path(input_path: Path) -> Path:
    """`NAME.txt` -> `NAME.expect.toml` beside it."""
    return input_path.with_name(input_path.stem + EXPECT_SUFFIX)


def for_test_prompt(workspace: Workspace, prompt: Path, prelude_name: str) -> Expectations | None:
    """The expectations of a test prompt (its prelude's and its own), or None if it has none.
    Raises ExpectationError for a bad file."""
    prelude_file = _read(workspace.folder(PRELUDES) / f"{prelude_name}{EXPECT_SUFFIX}", workspace)
    own = _read(expectations_path(prompt), workspace)
    return _merge(prelude_file, own)


def for_draft(workspace: Workspace, draft: Path) -> Expectations | None:
    """A draft's own expectations, or None."""
    return _merge(None, _read(expectations_path(draft), workspace))


def _merge(prelude: _File | None, own: _File | None) -> Expectations | None:
    if prelude is None and own is None:
        return None
    checks = list(prelude.checks) if prelude is not None and not (own and own.replace) else []
    for check in own.checks if own else ():
        names = [c.name for c in checks]
        if check.name in names:
            checks[names.index(check.name)] = check
        else:
            checks.append(check)
    threshold = next((f.threshold for f in (own, prelude) if f is not None and f.threshold is not None),
                     DEFAULT_THRESHOLD)
    files = tuple(f.shown for f in (prelude, own) if f is not None)
    return Expectations(tuple(checks), threshold, files) if checks else None


# ----- reading a file ------------------------------------------------------------------------


def _shown(path: Path, workspace: Workspace) -> str:
    try:
        return path.relative_to(workspace.root).as_posix()
    except ValueError:
        return path.name


def _read(path: Path, workspace: Workspace) -> _File | None:
    shown = _shown(path, workspace)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else kind_of(mode)
        raise ExpectationError(f"{shown} is {what}, not a file; put the expectations themselves there")
    try:
        data, _ = read_regular(path, MAX_EXPECT_BYTES)
        values = tomllib.loads(data.decode("utf-8"))
    except OSError as error:
        raise ExpectationError(f"cannot read {shown}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ExpectationError(f"{shown} is not UTF-8 text (bad byte at offset {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise ExpectationError(f"{shown} is not valid TOML ({error}); fix the file") from None
    return _parse(values, shown, path.parent)


def _parse(values: dict[str, Any], shown: str, folder: Path) -> _File:
    unknown = sorted(set(values) - _TOP_KEYS)
    if unknown:
        raise ExpectationError(f"{shown}: unknown key {unknown[0]!r}; the keys are threshold, replace and "
                               "[[expect]] tables")
    threshold = values.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise ExpectationError(f"{shown}: threshold must be a number from 0 to 1 (a pass rate), not {threshold!r}")
    replace = values.get("replace", False)
    if not isinstance(replace, bool):
        raise ExpectationError(f"{shown}: replace must be true or false, not {replace!r}")
    tables = values.get("expect", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ExpectationError(f"{shown}: expect must be a list of tables, written [[expect]]")
    checks: list[Check] = []
    for index, table in enumerate(tables):
        check = _parse_check(table, f"{shown}: expect[{index}]", folder)
        if any(c.name == check.name for c in checks):
            raise ExpectationError(f"{shown}: expect[{index}].name: {check.name!r} is used twice; "
                                   "give each check its own name")
        checks.append(check)
    return _File(tuple(checks), None if threshold is None else float(threshold), replace, shown)


def _parse_check(table: dict[str, Any], where: str, folder: Path) -> Check:
    kinds = [key for key in table if key != "name"]
    unknown = [key for key in kinds if key not in _CHECK_KEYS]
    if unknown:
        raise ExpectationError(f"{where}.{unknown[0]}: unknown check; the checks are "
                               + ", ".join(_CHECK_KEYS))
    if len(kinds) != 1:
        raise ExpectationError(f"{where}: has {len(kinds)} checks ({', '.join(kinds) or 'none'}); "
                               "give each check its own [[expect]]")
    kind = _CHECK_KEYS[kinds[0]]
    key = f"{where}.{kind.value}"
    value = _parse_value(kind, table[kind.value], key, folder)
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ExpectationError(f"{where}.name: must be a non-empty string, not {name!r}")
    return Check(kind, value, name or _default_name(kind, table[kind.value]))


def _parse_value(kind: CheckKind, raw: Any, key: str, folder: Path) -> Any:
    if kind in _STRINGS:
        if not isinstance(raw, str):
            raise ExpectationError(f"{key}: must be a string, not {_type(raw)}")
        return raw
    if kind in _STRING_LISTS:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
            raise ExpectationError(f"{key}: must be a non-empty string or a list of them, not {raw!r}")
        return tuple(items)
    if kind in _PATTERNS:
        return _compile(raw, key)
    if kind in _RANGES:
        return _range(raw, key)
    if kind in _FLAGS:
        if not isinstance(raw, bool):
            raise ExpectationError(f"{key}: must be true or false, not {raw!r}")
        return raw
    return _schema_validator(raw, key, folder)


def _type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _compile(raw: Any, key: str) -> Any:
    if not isinstance(raw, str) or not raw:
        raise ExpectationError(f"{key}: must be a non-empty regular expression string, not {raw!r}")
    if len(raw) > MAX_PATTERN_CHARS:
        raise ExpectationError(f"{key}: the pattern is longer than {MAX_PATTERN_CHARS} characters")
    try:
        return regex.compile(raw)
    except (regex.error, ValueError, OverflowError, RecursionError) as error:
        raise ExpectationError(f"{key}: the regular expression {raw!r} does not compile ({error})") from None


def _range(raw: Any, key: str) -> tuple[int, int]:
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if count(raw):
        return raw, raw
    if isinstance(raw, list) and len(raw) == 2 and all(count(v) for v in raw) and raw[0] <= raw[1]:
        return raw[0], raw[1]
    raise ExpectationError(f"{key}: must be a count (e.g. 6) or [min, max] with 0 <= min <= max, not {raw!r}")


def _schema_validator(raw: Any, key: str, folder: Path) -> Any:
    if isinstance(raw, str):
        schema = _schema_file(raw, key, folder)
    elif isinstance(raw, dict):
        schema = raw
    else:
        raise ExpectationError(f"{key}: must be a schema file's path or an inline table, not {_type(raw)}")
    _refuse_remote_refs(schema, key)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ExpectationError(f"{key}: not a valid JSON schema ({error.message})") from None
    return validator_class(schema)


def _schema_file(raw: str, key: str, folder: Path) -> Any:
    relative = PurePosixPath(raw)
    if not raw or relative.is_absolute() or ".." in relative.parts or "\\" in raw:
        raise ExpectationError(f"{key}: {raw!r} must be a path inside the expectations file's folder "
                               "(relative, without '..')")
    path = folder.joinpath(*relative.parts)
    try:
        data, _ = read_regular(path, MAX_SCHEMA_BYTES)  # no link, no FIFO, bounded
        return json.loads(data.decode("utf-8"))
    except OSError as error:
        raise ExpectationError(f"{key}: cannot read the schema {raw}: {error.strerror or error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ExpectationError(f"{key}: the schema {raw} is not JSON ({error})") from None


def _refuse_remote_refs(schema: Any, key: str) -> None:
    """Nothing is fetched: only references inside the schema ("#/...") are allowed."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
                raise ExpectationError(f"{key}: \"$ref\": {ref!r} points outside the schema; only local "
                                       "references (\"#/...\") are followed, nothing is fetched")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _default_name(kind: CheckKind, raw: Any) -> str:
    if isinstance(raw, bool):
        return kind.value if raw else f"{kind.value} = false"
    if kind is CheckKind.JSON_SCHEMA and isinstance(raw, dict):
        return kind.value
    shown = raw if isinstance(raw, str) and kind is CheckKind.JSON_SCHEMA else json.dumps(raw, ensure_ascii=False)
    if len(shown) > SHOWN_VALUE_CHARS:
        shown = shown[:SHOWN_VALUE_CHARS - 1] + "…"
    return f"{kind.value} {shown}"
