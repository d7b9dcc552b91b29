"""The OpenAI-compatible protocol as vLLM serves it: `GET /v1/models`, `POST /tokenize` (vLLM's
own), `POST /v1/completions` with token ids (`n`; `usage.prompt_tokens_details.cached_tokens`).
llama-server serves it too (`--server-api openai`).

Structured outputs are not part of OpenAI's protocol; each server takes its own fields, so
the dialect is found when the server is probed (`StructuredDialect`):
  - vLLM 0.10.2 and later: `structured_outputs: {"json": SCHEMA}` or `{"grammar": GBNF}`;
  - vLLM before 0.10.2: `guided_json` / `guided_grammar` (deprecated in 0.10.2 and removed in
    0.12, which ignores them without a word: hence the version check, from `GET /version`);
  - llama-server (its /v1/models says `owned_by: llamacpp`): `json_schema` / `grammar`, as on
    its /completion;
  - any other server: none known, so a schema or grammar is refused rather than ignored.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

from cached_prompts.backend.interface import BackendKind, OutputConstraint, StopReason
from cached_prompts.errors import ServerDownError, ServerError
from cached_prompts.server.api import (CompletionAsk, Generated, ServerApi, ServerInfo, first_model,
                                       model_id_of, sampling_fields)
from cached_prompts.server.http import HttpConnection
from cached_prompts.server.responses import OpenAiCompletion, Tokens, Version, parse_answer

TOKENIZE_BASE_BYTES = 64 << 10
BYTES_PER_TEXT_BYTE = 16
STRUCTURED_OUTPUTS_SINCE = (0, 10, 2)  # vLLM's first version with `structured_outputs`
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


class StructuredDialect(str, enum.Enum):
    """How an OpenAI-compatible server is told to constrain outputs."""

    VLLM_STRUCTURED = "vllm structured_outputs"
    VLLM_GUIDED = "vllm guided_*"
    LLAMA_SERVER = "llama-server json_schema/grammar"
    NONE = "none"

    def fields(self, constraint: OutputConstraint) -> dict[str, Any]:
        schema = constraint.json_schema
        if self is StructuredDialect.VLLM_STRUCTURED:
            return {"structured_outputs": {"json": schema} if schema is not None else {"grammar": constraint.grammar}}
        if self is StructuredDialect.VLLM_GUIDED:
            return {"guided_json": schema} if schema is not None else {"guided_grammar": constraint.grammar}
        if self is StructuredDialect.LLAMA_SERVER:
            return {"json_schema": schema} if schema is not None else {"grammar": constraint.grammar}
        raise ServerError("this server takes no schema or grammar; report this bug (it was not refused earlier)")


def probe_openai_server(http: HttpConnection) -> "OpenAiApi":
    model = first_model(http)
    n_ctx = model.max_model_len or (model.meta.n_ctx if model.meta else None)  # vLLM's, llama-server's
    info = ServerInfo(http.url, BackendKind.OPENAI, model_id_of(model), n_ctx if n_ctx and n_ctx > 0 else None, None)
    return OpenAiApi(http, info, structured_dialect(http, llama_server=model.owned_by == "llamacpp"))


def structured_dialect(http: HttpConnection, *, llama_server: bool) -> StructuredDialect:
    if llama_server:
        return StructuredDialect.LLAMA_SERVER
    try:
        answer = http.get_json("/version", missing_ok=True)
    except ServerDownError:
        raise
    except ServerError:  # a server without /version (401, 405, not JSON...) is no vLLM we know
        return StructuredDialect.NONE
    if answer is None:
        return StructuredDialect.NONE
    found = _VERSION.match(parse_answer(Version, answer, f"{http.url}/version").version)
    if found is None:
        return StructuredDialect.NONE
    version = tuple(int(part or 0) for part in found.groups())
    return StructuredDialect.VLLM_STRUCTURED if version >= STRUCTURED_OUTPUTS_SINCE else StructuredDialect.VLLM_GUIDED


class OpenAiApi(ServerApi):
    kind = BackendKind.OPENAI

    def __init__(self, http: HttpConnection, info: ServerInfo, dialect: StructuredDialect) -> None:
        super().__init__(http, info)
        self.dialect = dialect

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        # vLLM's fields, plus llama-server's `content` for its OpenAI path.
        body = {"model": self.info.model_id, "prompt": text, "add_special_tokens": add_special, "content": text,
                "add_special": add_special}
        limit = TOKENIZE_BASE_BYTES + BYTES_PER_TEXT_BYTE * len(text.encode("utf-8"))
        answer = self.http.post_json("/tokenize", body, limit=limit)
        try:
            return parse_answer(Tokens, answer, f"{self.url}/tokenize").tokens
        except ServerError as error:
            raise ServerError(f"{error} (the OpenAI path needs a server with vLLM's /tokenize)") from None

    def check_constraint(self, source: str) -> None:
        if self.dialect is StructuredDialect.NONE:
            super().check_constraint(source)

    def complete(self, ask: CompletionAsk) -> Generated:
        # Both llama-server's and vLLM's names for the repetition penalty: each reads its own.
        body: dict[str, Any] = {"model": self.info.model_id, "prompt": ask.prompt, "n": ask.n,
                                **sampling_fields(ask.sampling, ask.seed), "max_tokens": ask.max_tokens,
                                "repetition_penalty": ask.sampling.repeat_penalty}
        if ask.constraint is not None:
            body.update(self.dialect.fields(ask.constraint))
        limit = ask.answer_limit(len(json.dumps(body)))
        where = f"{self.url}/v1/completions"
        answer = parse_answer(OpenAiCompletion, self.http.post_json("/v1/completions", body, limit=limit), where)
        if len(answer.choices) != ask.n:
            raise ServerError(f"{where} answered {len(answer.choices)} choices, not {ask.n}")
        choices = sorted(answer.choices, key=lambda choice: choice.index)
        usage = answer.usage
        texts = [choice.text for choice in choices]
        if ask.n == 1:
            tokens = [(usage.completion_tokens or 0) if usage else 0]
        else:
            # vLLM's usage sums the choices, llama-server's counts the first: count each
            # answer's text instead (without the stop string or end token that ended it).
            tokens = [len(self.tokenize(text, add_special=False)) for text in texts]
        details = usage.prompt_tokens_details if usage else None
        return Generated(texts=texts, tokens=tokens, prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
                         cached_tokens=details.cached_tokens if details else None, slot=None,
                         stop_reasons=[_stop_reason(choice.finish_reason, choice.stop_reason) for choice in choices])


def _stop_reason(finish: str | None, stop: int | str | None) -> StopReason | None:
    """`finish_reason` "length" is a cut answer; "stop" is the end token, or a stop string
    where the server names it in `stop_reason` (vLLM: the string or token id, null for EOS)."""
    if finish == "length":
        return StopReason.MAX_TOKENS
    if finish == "stop":
        return StopReason.STOP_STRING if isinstance(stop, str) else StopReason.END_TOKEN
    return None
