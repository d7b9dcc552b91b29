"""What this tool asks of one server, whichever protocol it speaks: the `ServerApi`
interface, its two implementations (server/llama_api.py: llama-server's own `/completion`;
server/openai_api.py: OpenAI-compatible `/v1/completions`, as vLLM serves it) and the probe
that picks one (`--server-api auto|llama|openai`).

Both protocols take token ids as the prompt and give the j-th of n completions the request's
seed + j. An answer is validated (server/responses.py) and read with a size limit derived from
what was asked (server/http.py), so a server answering off its protocol is a clear error.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from cached_prompts.backend.interface import BackendKind, OutputConstraint, StopReason
from cached_prompts.errors import ConstraintError, ServerError
from cached_prompts.options import SamplingOptions
from cached_prompts.server.http import HttpConnection
from cached_prompts.server.responses import ModelEntry, ModelList, parse_answer

log = logging.getLogger(__name__)

ANSWER_BASE_BYTES = 1 << 20  # of any completion answer: its fields, timings, settings
# A token's text is at most a few hundred bytes, each at most 6 in JSON (\u00XX).
MAX_BYTES_PER_TOKEN = 1536


@dataclass(frozen=True)
class ServerInfo:
    """What a server said about itself when probed."""

    url: str
    kind: BackendKind
    model_id: str
    n_ctx: int | None  # per slot / per request; None: the server does not say
    slots: int | None  # requests it decodes at once; None: the server does not say


@dataclass(frozen=True)
class CompletionAsk:
    """One completion request: `n` answers to `prompt` (token ids; text in benchmarks)."""

    prompt: list[int] | str
    n: int
    sampling: SamplingOptions
    max_tokens: int
    seed: int | None  # of the first answer; None: greedy (seed 0, temperature 0)
    constraint: OutputConstraint | None = None  # a schema is sent as such, else the grammar
    slot: int | None = None  # llama-server: the slot to use
    # (answer index, new text): a client that can stream sends each answer's text as it comes
    on_text: Callable[[int, str], None] | None = None

    def answer_limit(self, request_bytes: int) -> int:
        """The most bytes a sound answer can have. llama-server echoes each answer's settings
        (prompt text, grammar) with it, so each answer may repeat the request's size."""
        return ANSWER_BASE_BYTES + self.n * (self.max_tokens * MAX_BYTES_PER_TOKEN + 2 * request_bytes)


@dataclass
class Generated:
    """The answer to one completion request."""

    texts: list[str]
    tokens: list[int]  # generated tokens per text
    prompt_tokens: int
    cached_tokens: int | None  # prompt tokens the server took from its cache; None: not reported
    slot: int | None  # llama-server's slot that evaluated the prompt
    stop_reasons: list[StopReason | None] = field(default_factory=list)  # per text; None: not said
    streamed: int = 0  # text pieces already handed to CompletionAsk.on_text (0: not streamed)


@dataclass(frozen=True)
class SlotFile:
    tokens: int
    bytes: int


def sampling_fields(sampling: SamplingOptions, seed: int | None) -> dict[str, Any]:
    """The request fields both protocols share for our sampling options; greedy = temperature 0.
    (llama-server reads its own names on /v1/completions too; vLLM ignores the ones it lacks.)"""
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
    return fields


class ServerApi(ABC):
    """One probed server, spoken to in its protocol."""

    kind: BackendKind
    # Tokens asked for when only the prompt is to be evaluated (a warm-up).
    warm_up_tokens: int = 1

    def __init__(self, http: HttpConnection, info: ServerInfo) -> None:
        self.http = http
        self.info = info

    @property
    def url(self) -> str:
        return self.http.url

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Tokens of `text` (special tokens parsed); `add_special` adds BOS if the model wants one."""

    @abstractmethod
    def complete(self, ask: CompletionAsk) -> Generated:
        """`ask.n` completions of `ask.prompt`."""

    def check_constraint(self, source: str) -> None:
        """Raise ConstraintError unless this server constrains outputs to a schema or grammar."""
        raise ConstraintError(f"{source}: {self.url} ({self.kind.value}) cannot constrain outputs to a "
                              "grammar or JSON schema; use llama-server, vLLM or the local engine")

    # ----- slot files (llama-server's --slot-save-path); others have none ---------------------------

    @property
    def saves_slots(self) -> bool:
        return False

    def idle_slots(self) -> list[int]:
        return []

    def save_slot(self, slot: int, filename: str) -> SlotFile | None:
        return None

    def restore_slot(self, slot: int, filename: str) -> SlotFile | None:
        return None


def first_model(http: HttpConnection) -> ModelEntry:
    """The first model `GET /v1/models` lists (a warning if it lists more)."""
    models = parse_answer(ModelList, http.get_json("/v1/models"), f"{http.url}/v1/models")
    if not models.data:
        raise ServerError(f"{http.url}/v1/models lists no model; is the server still loading it?")
    if len(models.data) > 1:
        log.warning("%s serves %d models; using the first, %s", http.url, len(models.data), models.data[0].id)
    return models.data[0]


def model_id_of(model: ModelEntry) -> str:
    """The served model's name; for a GGUF path (llama-server without --alias), its file
    name, so that the same model served from different folders is the same model."""
    return PurePosixPath(model.id).name if model.id.lower().endswith(".gguf") else model.id
