"""The wire format of `stdio-json-repl`: request lines in, response lines out, and the
validation of every command's arguments. No engine here, so all of it is cheap to test.

A request line is a JSON5 object `{command: "...", arguments: {...}, id: ...}`; a response
is one strict-JSON line `{"status": "Ok"|"SystemError", "value": ..., "message": ..., "id": ...}`
(`id` only when the request had a valid one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Iterable

import json5
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cached_prompts.errors import ProtocolError

MAX_LINE_BYTES = 4 * 1024 * 1024
# The json5 library parses about 200 KB/s; longer lines must be strict JSON (parsed in C).
MAX_JSON5_BYTES = 256 * 1024
MAX_PRELUDE_ID_CHARS = 200
MAX_REQUEST_ID_CHARS = 200
MAX_OUTPUTS = 256  # per request, all prompts together
MAX_PROMPTS = 64  # in one request's 'prompts'
REPR_CHARS = 60

REQUEST_KEYS = ("command", "arguments", "id")
PRELUDE_ID_RULE = (f"a prelude_id has 1-{MAX_PRELUDE_ID_CHARS} characters, none of them '/', '\\', ':' "
                   "or a control character, no leading or trailing whitespace, and is not '.' or '..'")


# ----- responses -------------------------------------------------------------------------------


class _NoId:
    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Any = _NoId()


def ok(value: Any, request_id: Any = NO_ID) -> dict[str, Any]:
    return _response("Ok", value, "", request_id)


def failure(message: str, request_id: Any = NO_ID) -> dict[str, Any]:
    return _response("SystemError", None, message, request_id)


def _response(status: str, value: Any, message: str, request_id: Any) -> dict[str, Any]:
    response = {"status": status, "value": value, "message": message}
    if request_id is not NO_ID:
        response["id"] = request_id
    return response


def encode_response(response: dict[str, Any]) -> bytes:
    """One strict-JSON line in UTF-8. Requests are checked for NaN and lone surrogates, so
    failing here is a bug; the client still gets a well-formed line saying so."""
    try:
        return (json.dumps(response, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as error:
        fallback = failure(f"internal error: the response could not be encoded ({error}); "
                           "please report this with the request line", response.get("id", NO_ID))
        return (json.dumps(fallback, ensure_ascii=True, default=repr) + "\n").encode("ascii")


def oversized_line(n_bytes: int) -> dict[str, Any]:
    return failure(f"the request line has {n_bytes} bytes, the limit is {MAX_LINE_BYTES}; "
                   "send shorter prompts (the context holds far less anyway)")


# ----- parsing -----------------------------------------------------------------------------------


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= REPR_CHARS else text[:REPR_CHARS] + "…"


def decode_line(line: bytes | str) -> str:
    if isinstance(line, str):
        text = line
    else:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(f"the request line is not valid UTF-8 (bad byte {line[error.start]:#04x} "
                                f"at offset {error.start}); encode requests as UTF-8") from None
    return text.removeprefix("\ufeff").rstrip("\r\n")


def parse_json5(text: str) -> Any:
    """The value of one request line: strict JSON fast, otherwise JSON5."""
    if not text.strip():
        raise ProtocolError('the request line is empty; send one JSON5 object per line, e.g. '
                            '{command: "info"}')
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ProtocolError("the request is nested too deeply; a request is a flat object") from None
    except ValueError:
        pass  # not strict JSON; JSON5 below
    if len(text.encode("utf-8")) > MAX_JSON5_BYTES:
        raise ProtocolError(f"a request line over {MAX_JSON5_BYTES} bytes must be strict JSON "
                            "(quoted keys, double quotes), it is not; encode it with a JSON library")
    try:
        return _join_surrogate_pairs(json5.loads(text, object_pairs_hook=_unique_keys))
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError("the request is nested too deeply; a request is a flat object") from None
    except Exception as error:  # json5 raises ValueError, but any parser failure is the line's fault
        raise ProtocolError(f"the request line is not valid JSON5 ({error}); send one object per line, "
                            'e.g. {command: "info"}') from None


def _join_surrogate_pairs(value: Any) -> Any:
    """json5 leaves an escaped pair like "\\ud83d\\ude00" as two surrogates; join them into
    the one character they mean (lone surrogates stay, check_values refuses them)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if isinstance(value, dict):
        return {_join_surrogate_pairs(k): _join_surrogate_pairs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_surrogate_pairs(item) for item in value]
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ProtocolError(f"the key {short_repr(key)} appears twice in one object; give it once")
        result[key] = value
    return result


def check_values(value: Any) -> None:
    """Refuse what strict JSON and UTF-8 cannot carry: NaN, ±Infinity, lone surrogates."""
    stack: list[tuple[str, Any]] = [("the request", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ProtocolError(f"{where} is {item}; only finite numbers are allowed")
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, f"a key in {where}")
                stack.append((key if where == "the request" else f"{where}.{key}", child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(item))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ProtocolError(f"{where} has a lone surrogate {text[error.start]!r} at character "
                            f"{error.start}, which is not Unicode text; escape a character beyond "
                            "U+FFFF as a high-low surrogate pair or send it as UTF-8") from None


@dataclass
class Request:
    command: str
    arguments: dict[str, Any]


def request_id_of(payload: Any) -> Any:
    """The request's `id` (NO_ID if absent); the payload must be an object."""
    if not isinstance(payload, dict):
        raise ProtocolError(f"a request must be a JSON object, got {type(payload).__name__} "
                            f"{short_repr(payload)}; e.g. {{command: \"info\"}}")
    if "id" not in payload:
        return NO_ID
    request_id = payload["id"]
    if request_id is None or (isinstance(request_id, int) and not isinstance(request_id, bool)):
        return request_id
    if isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID_CHARS:
        _check_text(request_id, "'id'")
        return request_id
    raise ProtocolError(f"'id' must be a string of at most {MAX_REQUEST_ID_CHARS} characters, an "
                        f"integer or null, got {short_repr(request_id)}")


def split_request(payload: dict[str, Any], commands: Iterable[str]) -> Request:
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if unknown:
        raise ProtocolError(f"unknown request key(s) {', '.join(map(short_repr, unknown))}; a request has "
                            "'command', optional 'arguments' and optional 'id'")
    known = ", ".join(sorted(commands))
    if "command" not in payload:
        raise ProtocolError(f"the request has no 'command'; valid commands: {known}")
    command = payload["command"]
    if not isinstance(command, str) or command not in set(commands):
        raise ProtocolError(f"unknown command {short_repr(command)}; valid commands: {known}")
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ProtocolError(f"'arguments' must be an object, got {type(arguments).__name__} "
                            f"{short_repr(arguments)}")
    return Request(command, arguments)


# ----- arguments of each command -----------------------------------------------------------------


def check_prelude_id(value: str) -> str:
    problem = None
    if not value:
        problem = "it is empty"
    elif len(value) > MAX_PRELUDE_ID_CHARS:
        problem = f"it has {len(value)} characters"
    elif value in (".", ".."):
        problem = "it names a folder"
    elif value != value.strip():
        problem = "it has leading or trailing whitespace"
    else:
        bad = next((c for c in value if c in "/\\:" or ord(c) < 32 or 127 <= ord(c) < 160), None)
        if bad is not None:
            problem = f"it contains {bad!r}"
    if problem:
        raise ValueError(f"{problem}; {PRELUDE_ID_RULE}")
    return value


PreludeId = Annotated[str, AfterValidator(check_prelude_id)]


class Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SinglePromptArguments(Arguments):
    prelude_id: PreludeId
    prelude: str
    prompt: str | None = None
    prompts: list[str] | None = Field(None, min_length=1, max_length=MAX_PROMPTS)  # in place of prompt
    number_of_random_outputs: int = Field(1, ge=0, le=MAX_OUTPUTS)
    add_nonrandom_output_to_front: bool = False
    inference_parameters: dict[str, Any] = Field(default_factory=dict)
    json_schema: dict[str, Any] | None = None  # every output matches it (structured.py)
    grammar: str | None = None  # GBNF, root rule `root`; in place of json_schema

    @model_validator(mode="after")
    def _one_of_each(self) -> "SinglePromptArguments":
        if self.prompt is None and self.prompts is None:
            raise ValueError("missing required argument 'prompt' (or 'prompts', a list of prompts)")
        if self.prompt is not None and self.prompts is not None:
            raise ValueError("give 'prompt' (one prompt) or 'prompts' (a list of them), not both")
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give 'json_schema' or 'grammar', not both")
        outputs = len(self.prompt_texts) * (self.number_of_random_outputs + self.add_nonrandom_output_to_front)
        if outputs > MAX_OUTPUTS:
            raise ValueError(f"{len(self.prompt_texts)} prompts x "
                             f"{self.number_of_random_outputs + self.add_nonrandom_output_to_front} outputs "
                             f"= {outputs} outputs, more than {MAX_OUTPUTS}; ask for fewer")
        return self

    @property
    def prompt_texts(self) -> list[str]:
        return [self.prompt] if self.prompts is None else list(self.prompts)


class CountTokensArguments(Arguments):
    text: str
    as_prelude: bool = False


class PrecacheArguments(Arguments):
    prelude_id: PreludeId
    prelude: str


class DropPreludeArguments(Arguments):
    prelude_id: PreludeId


class NoArguments(Arguments):
    pass


def validate(model: type[BaseModel], values: dict[str, Any], where: str, noun: str = "argument",
             aliases: tuple[str, ...] = ()) -> Any:
    """`values` validated into `model`; a ProtocolError names every bad key."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise ProtocolError(describe(error, where, noun, sorted(model.model_fields) + list(aliases))) from None


def describe(error: ValidationError, where: str, noun: str, known: list[str]) -> str:
    parts, unknown = [], False
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "(value)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown {noun} '{name}'")
            unknown = True
        elif item["type"] == "missing":
            parts.append(f"missing required {noun} '{name}'")
        elif not item["loc"]:  # a check of the arguments together
            parts.append(item["msg"].removeprefix("Value error, "))
        else:
            message = item["msg"].removeprefix("Value error, ")
            parts.append(f"'{name}': {message} (got {short_repr(item.get('input'))})")
    valid = f"; valid {noun}s: {', '.join(known) or 'none'}" if unknown else ""
    return f"{where}: " + "; ".join(parts) + valid
