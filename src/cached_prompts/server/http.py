"""The HTTP connection to one server: pooled connections, answers read with a size limit,
and failures turned into our errors.

A server that cannot be used now (refused, reset, 5xx, 408/429, timeout) raises
ServerDownError, so that another server can take the work; a 4xx raises ServerError with the
server's own message; an answer larger than the caller's limit raises ServerError (a server
is never trusted to send a bounded answer: 25 MB of text for 8 tokens is refused, not written
to an output file).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from cached_prompts.errors import ContextOverflowError, ServerDownError, ServerError

log = logging.getLogger(__name__)
# httpx logs every request at INFO; our INFO is the progress on stderr.
logging.getLogger("httpx").setLevel(logging.WARNING)

CONNECT_TIMEOUT = 10.0
MAX_ERROR_CHARS = 500
MAX_ERROR_BYTES = 64 << 10  # of an error answer: the rest is not read
SMALL_ANSWER_BYTES = 4 << 20  # /props (with its chat template), /v1/models, /slots, /metrics


class NotSupportedError(ServerError):
    """The server does not offer this (llama-server without --slot-save-path: HTTP 501)."""


class HttpConnection:
    """Pooled HTTP connections to one server."""

    def __init__(self, url: str, *, timeout: float, max_connections: int = 32) -> None:
        self.url = url
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=url, timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    def close(self) -> None:
        self._http.close()

    def get_json(self, path: str, *, limit: int = SMALL_ANSWER_BYTES, missing_ok: bool = False) -> Any:
        """The JSON answer of GET `path`; None for a 404 with `missing_ok`."""
        return self._json(path, self._send("GET", path, limit=limit, missing_ok=missing_ok))

    def post_json(self, path: str, body: dict[str, Any], *, limit: int, params: dict[str, str] | None = None,
                  missing_ok: bool = False) -> Any:
        return self._json(path, self._send("POST", path, limit=limit, missing_ok=missing_ok, json=body,
                                           params=params))

    def post_events(self, path: str, body: dict[str, Any], *, limit: int) -> Iterator[Any]:
        """The JSON of each `data:` line of a streamed answer (server-sent events), read with the
        same limit on the whole answer and the same errors as post_json."""
        try:
            with self._http.stream("POST", path, json=body) as response:
                if not response.is_success:
                    self._raise_for(response.status_code, response.reason_phrase,
                                    _read_at_most(response, MAX_ERROR_BYTES)[0], path)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise self._too_large(path, limit, f"announced an answer of {int(declared)} bytes")
                for line in _lines_at_most(response, limit, lambda: self._too_large(
                        path, limit, "sent an answer of more bytes")):
                    if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                        yield self._json(path, line[6:])
        except httpx.TimeoutException:
            raise ServerDownError(f"{self.url}{path} gave no answer within {self.timeout:g} s; the server may "
                                  "be overloaded or stuck (raise --server-timeout to wait longer)") from None
        except httpx.ConnectError:
            raise ServerDownError(f"{self.url} cannot be reached (connection refused or no such host); "
                                  "is the server running there?") from None
        except httpx.TransportError as error:
            raise ServerDownError(f"{self.url} dropped the connection ({_describe_transport(error)}); "
                                  "did the server stop?") from None

    def _json(self, path: str, data: bytes | None) -> Any:
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            shown = data[:MAX_ERROR_CHARS].decode("utf-8", errors="replace")
            raise ServerError(f"{self.url}{path} answered something that is not JSON: {shown!r}") from None

    def _send(self, method: str, path: str, *, limit: int, missing_ok: bool = False, **kwargs: Any) -> bytes | None:
        """The body of a successful answer (at most `limit` bytes); None for a 404 with `missing_ok`."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.status_code == 404 and missing_ok:
                    return None
                if not response.is_success:
                    self._raise_for(response.status_code, response.reason_phrase,
                                    _read_at_most(response, MAX_ERROR_BYTES)[0], path)
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise self._too_large(path, limit, f"announced an answer of {int(declared)} bytes")
                data, complete = _read_at_most(response, limit)
                if not complete:
                    raise self._too_large(path, limit, "sent an answer of more bytes")
                return data
        except httpx.TimeoutException:
            raise ServerDownError(f"{self.url}{path} gave no answer within {self.timeout:g} s; the server may "
                                  "be overloaded or stuck (raise --server-timeout to wait longer)") from None
        except httpx.ConnectError:
            raise ServerDownError(f"{self.url} cannot be reached (connection refused or no such host); "
                                  "is the server running there?") from None
        except httpx.TransportError as error:
            raise ServerDownError(f"{self.url} dropped the connection ({_describe_transport(error)}); "
                                  "did the server stop?") from None

    def _too_large(self, path: str, limit: int, what: str) -> ServerError:
        return ServerError(f"{self.url}{path} {what} than the {limit} an answer to this request can take; "
                           "the server does not answer what it was asked (is it the server you meant?)")

    def _raise_for(self, status: int, reason: str, body: bytes, path: str) -> None:
        message, kind, details = _error_message(body, reason)
        where = f"{self.url}{path}"
        if kind == "not_supported_error" or status == 501:
            raise NotSupportedError(f"{where}: {message}")
        if kind == "exceed_context_size_error":
            n_ctx = details.get("n_ctx")
            raise ContextOverflowError(f"{where}: {message} (the server's n_ctx is {n_ctx} per slot; "
                                       "restart it with a larger -c, or shorten the prelude or prompt)")
        if status >= 500 or status in (408, 429):
            raise ServerDownError(f"{where} failed with HTTP {status}: {message}")
        raise ServerError(f"{where} refused the request with HTTP {status}: {message}")


def _read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether that was all of it."""
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > limit:
            return bytes(data[:limit]), False
    return bytes(data), True


def _lines_at_most(response: httpx.Response, limit: int, too_large: Callable[[], ServerError]) -> Iterator[bytes]:
    """The body's lines, counted in bytes as they arrive (not once a line is whole: a line
    without an end would otherwise be read whole, however long)."""
    pending = bytearray()
    read = 0
    for chunk in response.iter_bytes():
        read += len(chunk)
        if read > limit:
            raise too_large()
        pending += chunk
        *lines, rest = pending.split(b"\n")
        yield from (line.rstrip(b"\r") for line in lines)
        pending = bytearray(rest)
    if pending:
        yield bytes(pending).rstrip(b"\r")


def _error_message(body: bytes, reason: str) -> tuple[str, str, dict[str, Any]]:
    """(message, error type, the error object) of an error answer: llama-server's and newer
    vLLM's `{"error": {...}}`, older vLLM's `{"message": ...}`, FastAPI's `{"detail": ...}`."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace").strip()[:MAX_ERROR_CHARS] or reason, "", {}
    error = answer.get("error", answer) if isinstance(answer, dict) else {}
    if not isinstance(error, dict):
        return str(error)[:MAX_ERROR_CHARS], "", {}
    message = error.get("message", error.get("detail", answer))
    return str(message)[:MAX_ERROR_CHARS], str(error.get("type", "")), error


def _describe_transport(error: httpx.TransportError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
