"""llama-server's own protocol (llama.cpp's tools/server/README.md): `GET /props` (slots,
per-slot n_ctx), `POST /tokenize`, `POST /completion` with token ids (`n_cmpl` outputs of one
prompt, whose evaluated prompt is shared; `timings.cache_n` = prompt tokens taken from its
cache; `json_schema` or `grammar` to constrain the outputs), `POST /slots/ID?action=save|restore`
(a slot's KV to/from a file in its --slot-save-path), `GET /slots`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from cached_prompts.backend.interface import BackendKind, StopReason
from cached_prompts.errors import ServerDownError, ServerError
from cached_prompts.server.api import CompletionAsk, Generated, ServerApi, ServerInfo, SlotFile, first_model, model_id_of, sampling_fields
from cached_prompts.server.http import HttpConnection, NotSupportedError
from cached_prompts.server.responses import (LlamaCompletion, Props, Slot, SlotRestored, SlotSaved, Tokens,
                                             parse_answer)

log = logging.getLogger(__name__)

TOKENIZE_BASE_BYTES = 64 << 10
BYTES_PER_TEXT_BYTE = 16  # a token id and its comma per byte of text, at most
_STOP_TYPES = {"eos": StopReason.END_TOKEN, "word": StopReason.STOP_STRING, "limit": StopReason.MAX_TOKENS}


def probe_llama_server(http: HttpConnection, *, missing_ok: bool) -> "LlamaServerApi | None":
    """The server as a llama-server, from its /props; None if it has no /props and `missing_ok`."""
    props = http.get_json("/props", missing_ok=missing_ok)
    if props is None:
        return None
    try:
        checked = parse_answer(Props, props, f"{http.url}/props")
    except ServerError as error:
        raise ServerError(f"{error}; it is not a llama-server this tool knows: pass --server-api openai "
                          "to use its /v1/completions") from None
    info = ServerInfo(http.url, BackendKind.LLAMA_SERVER, model_id_of(first_model(http)),
                      checked.default_generation_settings.n_ctx, checked.total_slots)
    return LlamaServerApi(http, info)


class LlamaServerApi(ServerApi):
    kind = BackendKind.LLAMA_SERVER
    warm_up_tokens = 0  # llama-server evaluates the prompt and stops with n_predict 0

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        limit = TOKENIZE_BASE_BYTES + BYTES_PER_TEXT_BYTE * len(text.encode("utf-8"))
        answer = self.http.post_json("/tokenize", {"content": text, "add_special": add_special,
                                                   "parse_special": True}, limit=limit)
        return parse_answer(Tokens, answer, f"{self.url}/tokenize").tokens

    def check_constraint(self, source: str) -> None:
        """/completion takes `json_schema` and `grammar` (GBNF)."""

    def complete(self, ask: CompletionAsk) -> Generated:
        body: dict[str, Any] = {"prompt": ask.prompt, "cache_prompt": True, **sampling_fields(ask.sampling, ask.seed),
                                "n_predict": ask.max_tokens}
        if ask.n > 1:
            body["n_cmpl"] = ask.n
        if ask.slot is not None:
            body["id_slot"] = ask.slot
        if ask.constraint is not None:
            if ask.constraint.json_schema is not None:
                body["json_schema"] = ask.constraint.json_schema
            else:
                body["grammar"] = ask.constraint.grammar
        limit = ask.answer_limit(len(json.dumps(body)))
        where = f"{self.url}/completion"
        streamed = 0
        if ask.on_text is not None:
            results, streamed = self._streamed(body, limit, ask.on_text)
        else:
            answer = self.http.post_json("/completion", body, limit=limit)
            results = [parse_answer(LlamaCompletion, item, where) for item in (answer if isinstance(answer, list)
                                                                                  else [answer])]
        if len(results) != ask.n:
            raise ServerError(f"{where} answered {len(results)} completions, not {ask.n}")
        results.sort(key=lambda result: result.index)
        first = results[0]
        return Generated(texts=[r.content for r in results], tokens=[r.tokens_predicted for r in results],
                         prompt_tokens=first.tokens_evaluated,
                         cached_tokens=first.timings.cache_n if first.timings else None, slot=first.id_slot,
                         stop_reasons=[_stop_reason(r) for r in results], streamed=streamed)

    def _streamed(self, body: dict[str, Any], limit: int,
                  on_text: Callable[[int, str], None]) -> tuple[list[LlamaCompletion], int]:
        """`stream: true`: each token's text as it is decoded, then per answer a last event
        (`stop: true`) with the counts; the answers, with their whole text, and the pieces sent."""
        where = f"{self.url}/completion"
        texts: dict[int, list[str]] = {}
        finished: list[LlamaCompletion] = []
        pieces = 0
        for event in self.http.post_events("/completion", {**body, "stream": True}, limit=limit):
            chunk = parse_answer(LlamaCompletion, event, where)
            if chunk.content:
                texts.setdefault(chunk.index, []).append(chunk.content)
                on_text(chunk.index, chunk.content)
                pieces += 1
            if isinstance(event, dict) and event.get("stop"):
                finished.append(chunk.model_copy(update={"content": "".join(texts.get(chunk.index, []))}))
        return finished, pieces

    # ----- slot files ------------------------------------------------------------------------------

    @property
    def saves_slots(self) -> bool:
        return True

    def idle_slots(self) -> list[int]:
        """The slots no request is using now (none if the server hides its slots)."""
        slots = self.http.get_json("/slots", missing_ok=True)
        if slots is None:
            return []
        if not isinstance(slots, list):
            raise ServerError(f"{self.url}/slots answered {type(slots).__name__}, not a list of slots")
        return [slot.id for slot in (parse_answer(Slot, item, f"{self.url}/slots") for item in slots)
                if not slot.is_processing]

    def save_slot(self, slot: int, filename: str) -> SlotFile | None:
        """Save the slot's KV as `filename` in the server's --slot-save-path; None if the server
        was started without one."""
        answer = self._slot_action(slot, "save", filename)
        if answer is None:
            return None
        saved = parse_answer(SlotSaved, answer, f"{self.url}/slots/{slot}?action=save")
        return SlotFile(saved.n_saved, saved.n_written)

    def restore_slot(self, slot: int, filename: str) -> SlotFile | None:
        """Load a saved slot file into `slot`; None if the server has no such file (or saves no slots)."""
        try:
            answer = self._slot_action(slot, "restore", filename)
        except ServerDownError:
            raise
        except ServerError as error:
            log.debug("%s: no slot file %s to restore (%s)", self.url, filename, error)
            return None
        if answer is None:
            return None
        restored = parse_answer(SlotRestored, answer, f"{self.url}/slots/{slot}?action=restore")
        return SlotFile(restored.n_restored, restored.n_read)

    def _slot_action(self, slot: int, action: str, filename: str) -> Any:
        try:
            return self.http.post_json(f"/slots/{slot}", {"filename": filename}, params={"action": action},
                                       limit=TOKENIZE_BASE_BYTES)
        except NotSupportedError:
            return None


def _stop_reason(result: LlamaCompletion) -> StopReason | None:
    """llama-server's `stop_type` ("eos", "word", "limit"), or its older flags `stopped_*`."""
    known = _STOP_TYPES.get(result.stop_type or "")
    if known is not None:
        return known
    for flag, reason in ((result.stopped_eos, StopReason.END_TOKEN), (result.stopped_word, StopReason.STOP_STRING),
                         (result.stopped_limit, StopReason.MAX_TOKENS)):
        if flag is True:
            return reason
    return None
