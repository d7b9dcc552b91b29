"""An HTTP client for one server, in either of the two protocols it may speak.

llama-server (llama.cpp's tools/server/README.md): `GET /props` (slots, per-slot n_ctx),
`POST /tokenize`, `POST /completion` with token ids (`n_cmpl` outputs of one prompt, whose
evaluated prompt is shared; `timings.cache_n` = prompt tokens taken from its cache),
`POST /slots/ID?action=save|restore` (a slot's KV to/from a file in its --slot-save-path),
`GET /slots`, `GET /metrics`.
OpenAI-compatible (vLLM): `GET /v1/models`, `POST /tokenize` (vLLM's own), `POST
/v1/completions` with token ids (`n`; `usage.prompt_tokens_details.cached_tokens`).
Both servers give the j-th of n completions the request's seed + j.

Errors: a server that cannot be used now (refused, reset, 5xx, timeout) raises
ServerDownError, so that another server can take the work; a 4xx raises ServerError with
the server's own message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import httpx

from cached_prompts.backend.interface import BackendKind, StopReason
from cached_prompts.errors import ContextOverflowError, ServerDownError, ServerError
from cached_prompts.options import SamplingOptions, ServerApiName

log = logging.getLogger(__name__)
# httpx logs every request at INFO; our INFO is the progress on stderr.
logging.getLogger("httpx").setLevel(logging.WARNING)

CONNECT_TIMEOUT = 10.0
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class ServerInfo:
    """What a server said about itself when probed."""

    url: str
    kind: BackendKind
    model_id: str
    n_ctx: int | None  # per slot / per request; None: the server does not say
    slots: int | None  # requests it decodes at once; None: the server does not say


@dataclass
class Generated:
    """The answer to one completion request."""

    texts: list[str]
    tokens: list[int]  # generated tokens per text
    prompt_tokens: int
    cached_tokens: int | None  # prompt tokens the server took from its cache; None: not reported
    slot: int | None  # llama-server's slot that evaluated the prompt
    stop_reasons: list[StopReason | None] = field(default_factory=list)  # per text; None: not said


@dataclass(frozen=True)
class SlotFile:
    tokens: int
    bytes: int


def sampling_fields(sampling: SamplingOptions, kind: BackendKind, *, max_tokens: int,
                    seed: int | None) -> dict[str, Any]:
    """The request fields for our sampling options; greedy = temperature 0.

    On the OpenAI path both llama-server's and vLLM's names are sent for the repetition
    penalty (`repeat_penalty` / `repetition_penalty`): each server reads its own and
    ignores the other (vLLM logs the fields it ignores)."""
    fields: dict[str, Any] = {
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": sampling.min_p,
        "frequency_penalty": sampling.frequency_penalty, "presence_penalty": sampling.presence_penalty,
        "repeat_penalty": sampling.repeat_penalty, "repeat_last_n": sampling.repeat_last_n,
        "stop": list(sampling.stop), "seed": 0 if seed is None else seed,
    }
    if sampling.mirostat_mode and not sampling.greedy:
        fields.update(mirostat=sampling.mirostat_mode, mirostat_tau=sampling.mirostat_tau,
                      mirostat_eta=sampling.mirostat_eta)
    if kind is BackendKind.LLAMA_SERVER:
        fields["n_predict"] = max_tokens
    else:
        fields["max_tokens"] = max_tokens
        fields["repetition_penalty"] = sampling.repeat_penalty
    return fields


class ServerClient:
    """One server: a pooled HTTP connection set, its protocol, and typed calls."""

    def __init__(self, url: str, *, timeout: float, max_connections: int = 32) -> None:
        self.url = url
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=url, timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))

    def close(self) -> None:
        self._http.close()

    # ----- what the server is -----------------------------------------------------------------

    def probe(self, api: ServerApiName) -> ServerInfo:
        """Ask the server what it is; `auto`: llama-server if it answers /props."""
        if api != "openai":
            props = self._request("GET", "/props", missing_ok=api == "auto")
            if props is not None:
                return self._llama_info(props)
        models = self._request("GET", "/v1/models")
        first = _first_model(models, self.url)
        meta = first.get("meta") if isinstance(first.get("meta"), dict) else {}
        n_ctx = first.get("max_model_len", meta.get("n_ctx"))  # vLLM's, llama-server's; others may not say
        return ServerInfo(self.url, BackendKind.OPENAI, _model_id(first, self.url),
                          n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None, None)

    def _llama_info(self, props: Any) -> ServerInfo:
        settings = props.get("default_generation_settings") if isinstance(props, dict) else None
        slots = props.get("total_slots") if isinstance(props, dict) else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if not isinstance(slots, int) or not isinstance(n_ctx, int):
            raise ServerError(f"{self.url}/props has no total_slots or n_ctx, so it is not a llama-server "
                              "this tool knows; pass --server-api openai to use its /v1/completions")
        models = self._request("GET", "/v1/models")
        return ServerInfo(self.url, BackendKind.LLAMA_SERVER, _model_id(_first_model(models, self.url), self.url),
                          n_ctx, max(1, slots))

    def metrics(self) -> dict[str, float]:
        """llama-server's Prometheus counters (`--metrics`), by name without the `llamacpp:` prefix."""
        response = self._send("GET", "/metrics")
        values: dict[str, float] = {}
        for line in response.text.splitlines():
            if line.startswith("llamacpp:") and " " in line:
                name, _, value = line.partition(" ")
                try:
                    values[name.removeprefix("llamacpp:")] = float(value)
                except ValueError:
                    continue
        return values

    # ----- tokens -------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, kind: BackendKind, model_id: str) -> list[int]:
        if kind is BackendKind.LLAMA_SERVER:
            body: dict[str, Any] = {"content": text, "add_special": add_special, "parse_special": True}
        else:
            # vLLM's fields, plus llama-server's `content` for its OpenAI path.
            body = {"model": model_id, "prompt": text, "add_special_tokens": add_special, "content": text,
                    "add_special": add_special}
        answer = self._request("POST", "/tokenize", json=body)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerError(f"{self.url}/tokenize did not answer with a list of token ids; "
                              "the OpenAI path needs a server with vLLM's /tokenize")
        return tokens

    # ----- completions --------------------------------------------------------------------------

    def complete(self, kind: BackendKind, model_id: str, prompt: list[int] | str, n: int,
                 fields: dict[str, Any], *, slot: int | None = None) -> Generated:
        """`n` completions of the token ids `prompt`; llama-server: on `slot` if given."""
        if kind is BackendKind.LLAMA_SERVER:
            body = {"prompt": prompt, "cache_prompt": True, **fields}
            if n > 1:
                body["n_cmpl"] = n
            if slot is not None:
                body["id_slot"] = slot
            return self._llama_completion(self._request("POST", "/completion", json=body), n)
        body = {"model": model_id, "prompt": prompt, "n": n, **fields}
        return self._openai_completion(self._request("POST", "/v1/completions", json=body), n, model_id)

    def _llama_completion(self, answer: Any, n: int) -> Generated:
        results = answer if isinstance(answer, list) else [answer]
        if len(results) != n or not all(isinstance(r, dict) and isinstance(r.get("content"), str)
                                         for r in results):
            raise ServerError(f"{self.url}/completion answered {len(results)} completions, not {n}")
        results = sorted(results, key=lambda r: r.get("index", 0))
        first = results[0]
        timings = first.get("timings") if isinstance(first.get("timings"), dict) else {}
        cached = timings.get("cache_n")
        return Generated(texts=[r["content"] for r in results],
                         tokens=[int(r.get("tokens_predicted", 0)) for r in results],
                         prompt_tokens=int(first.get("tokens_evaluated", 0)),
                         cached_tokens=cached if isinstance(cached, int) else None,
                         slot=first.get("id_slot") if isinstance(first.get("id_slot"), int) else None,
                         stop_reasons=[_llama_stop_reason(r) for r in results])

    def _openai_completion(self, answer: Any, n: int, model_id: str) -> Generated:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != n or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise ServerError(f"{self.url}/v1/completions did not answer with {n} choices")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        texts = [c["text"] for c in choices]
        if n == 1:
            tokens = [int(usage.get("completion_tokens") or 0)]
        else:
            # vLLM's usage sums the choices, llama-server's counts the first: count each
            # answer's text instead (without the stop string or end token that ended it).
            tokens = [len(self.tokenize(t, add_special=False, kind=BackendKind.OPENAI, model_id=model_id))
                      for t in texts]
        return Generated(texts=texts, tokens=tokens,
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         cached_tokens=cached if isinstance(cached, int) else None, slot=None,
                         stop_reasons=[_openai_stop_reason(c) for c in choices])

    # ----- slots (llama-server) ------------------------------------------------------------------

    def idle_slots(self) -> list[int]:
        """The slots no request is using now (none if the server hides its slots)."""
        slots = self._request("GET", "/slots", missing_ok=True)
        return [slot["id"] for slot in (slots if isinstance(slots, list) else [])
                if isinstance(slot, dict) and not slot.get("is_processing", True) and isinstance(slot.get("id"), int)]

    def save_slot(self, slot: int, filename: str) -> SlotFile | None:
        """Save the slot's KV as `filename` in the server's --slot-save-path; None if the server
        was started without one."""
        return self._slot_action(slot, "save", filename)

    def restore_slot(self, slot: int, filename: str) -> SlotFile | None:
        """Load a saved slot file into `slot`; None if the server has no such file (or saves no slots)."""
        try:
            return self._slot_action(slot, "restore", filename)
        except ServerError as error:
            if isinstance(error, ServerDownError):
                raise
            log.debug("%s: no slot file %s to restore (%s)", self.url, filename, error)
            return None

    def _slot_action(self, slot: int, action: str, filename: str) -> SlotFile | None:
        try:
            answer = self._request("POST", f"/slots/{slot}", params={"action": action},
                                   json={"filename": filename})
        except _NotSupported:
            return None
        key = "n_saved" if action == "save" else "n_restored"
        count = answer.get(key) if isinstance(answer, dict) else None
        size = answer.get("n_written" if action == "save" else "n_read") if isinstance(answer, dict) else None
        if not isinstance(count, int):
            raise ServerError(f"{self.url}/slots/{slot}?action={action} answered without {key}")
        return SlotFile(count, size if isinstance(size, int) else 0)

    # ----- transport ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        """The JSON answer; None for a 404 with `missing_ok`."""
        response = self._send(method, path, missing_ok=missing_ok, **kwargs)
        if response is None:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"{self.url}{path} answered something that is not JSON: "
                              f"{response.text[:MAX_ERROR_CHARS]!r}") from None

    def _send(self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServerDownError(f"{self.url}{path} gave no answer within {self.timeout:g} s; the server may "
                                  "be overloaded or stuck (raise --server-timeout to wait longer)") from None
        except httpx.ConnectError:
            raise ServerDownError(f"{self.url} cannot be reached (connection refused or no such host); "
                                  "is the server running there?") from None
        except httpx.TransportError as error:
            raise ServerDownError(f"{self.url} dropped the connection ({_describe_transport(error)}); "
                                  "did the server stop?") from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.is_success:
            return response
        self._raise_for(response, path)

    def _raise_for(self, response: httpx.Response, path: str) -> None:
        status, message, kind, details = response.status_code, *_error_message(response)
        where = f"{self.url}{path}"
        if kind == "not_supported_error" or status == 501:
            raise _NotSupported(f"{where}: {message}")
        if kind == "exceed_context_size_error":
            n_ctx = details.get("n_ctx")
            raise ContextOverflowError(f"{where}: {message} (the server's n_ctx is {n_ctx} per slot; "
                                       "restart it with a larger -c, or shorten the prelude or prompt)")
        if status >= 500 or status in (408, 429):
            raise ServerDownError(f"{where} failed with HTTP {status}: {message}")
        raise ServerError(f"{where} refused the request with HTTP {status}: {message}")


class _NotSupported(ServerError):
    """The server does not offer this (llama-server without --slot-save-path)."""


def _error_message(response: httpx.Response) -> tuple[str, str, dict[str, Any]]:
    """(message, error type, the error object) of an error answer: llama-server's and newer
    vLLM's `{"error": {...}}`, older vLLM's `{"message": ...}`, FastAPI's `{"detail": ...}`."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:MAX_ERROR_CHARS] or response.reason_phrase, "", {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(error, dict):
        return str(error)[:MAX_ERROR_CHARS], "", {}
    message = error.get("message", error.get("detail", body))
    return str(message)[:MAX_ERROR_CHARS], str(error.get("type", "")), error


_LLAMA_STOP_TYPES = {"eos": StopReason.END_TOKEN, "word": StopReason.STOP_STRING, "limit": StopReason.MAX_TOKENS}


def _llama_stop_reason(result: dict[str, Any]) -> StopReason | None:
    """llama-server's `stop_type` ("eos", "word", "limit"), or its older flags `stopped_*`."""
    known = _LLAMA_STOP_TYPES.get(result.get("stop_type"))  # type: ignore[arg-type]
    if known is not None:
        return known
    for flag, reason in (("stopped_eos", StopReason.END_TOKEN), ("stopped_word", StopReason.STOP_STRING),
                         ("stopped_limit", StopReason.MAX_TOKENS)):
        if result.get(flag) is True:
            return reason
    return None


def _openai_stop_reason(choice: dict[str, Any]) -> StopReason | None:
    """`finish_reason` "length" is a cut answer; "stop" is the end token, or a stop string
    where the server names it in `stop_reason` (vLLM: the string or token id, null for EOS)."""
    finish = choice.get("finish_reason")
    if finish == "length":
        return StopReason.MAX_TOKENS
    if finish == "stop":
        return StopReason.STOP_STRING if isinstance(choice.get("stop_reason"), str) else StopReason.END_TOKEN
    return None


def _describe_transport(error: httpx.TransportError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _first_model(models: Any, url: str) -> dict[str, Any]:
    data = models.get("data") if isinstance(models, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or not data[0].get("id"):
        raise ServerError(f"{url}/v1/models lists no model; is the server still loading it?")
    if len(data) > 1:
        log.warning("%s serves %d models; using the first, %s", url, len(data), data[0]["id"])
    return data[0]


def _model_id(model: dict[str, Any], url: str) -> str:
    """The served model's name; for a GGUF path (llama-server without --alias), its file
    name, so that the same model served from different folders is the same model."""
    name = str(model["id"])
    return PurePosixPath(name).name if name.lower().endswith(".gguf") else name
