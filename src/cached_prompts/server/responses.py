"""What servers answer, as pydantic models (as the options are): every answer is validated
before a field of it is used, so a server answering off its protocol (`tokens_predicted:
"abc"`, `usage.completion_tokens: [1]`) is a clear error naming the server, what it sent and
where, never a traceback. Fields this tool does not read are ignored; the ones it reads have
strict types (no "12" for 12, no true for 1).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cached_prompts.errors import ServerError
from cached_prompts.options import describe_validation_error

Answer = TypeVar("Answer", bound=BaseModel)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


def parse_answer(model: type[Answer], data: Any, where: str) -> Answer:
    """`data` (a server's JSON answer at `where`, e.g. "http://h:8080/completion") as `model`."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ServerError(describe_validation_error(error, f"{where} answered off its protocol") +
                          "; is it the kind of server --server-api says?") from None


# ----- both protocols -----------------------------------------------------------------------------


class ModelMeta(_Answer):
    n_ctx: int | None = None


class ModelEntry(_Answer):
    id: str = Field(min_length=1)
    owned_by: str | None = None  # llama-server: "llamacpp"
    max_model_len: int | None = None  # vLLM's context length
    meta: ModelMeta | None = None  # llama-server's


class ModelList(_Answer):
    """`GET /v1/models`."""

    data: list[ModelEntry]


class Tokens(_Answer):
    """`POST /tokenize` (llama-server's and vLLM's)."""

    tokens: list[int]


# ----- llama-server ----------------------------------------------------------------------------


class GenerationSettings(_Answer):
    n_ctx: int = Field(gt=0)


class Props(_Answer):
    """`GET /props`."""

    total_slots: int = Field(gt=0)
    default_generation_settings: GenerationSettings


class Timings(_Answer):
    cache_n: int | None = None  # prompt tokens taken from its cache


class LlamaCompletion(_Answer):
    """One completion of `POST /completion` (a list of them with `n_cmpl`)."""

    content: str
    index: int = 0
    tokens_predicted: int = Field(0, ge=0)
    tokens_evaluated: int = Field(0, ge=0)
    id_slot: int | None = None
    timings: Timings | None = None
    stop_type: str | None = None  # "eos", "word", "limit"; older servers: the flags below
    stopped_eos: bool | None = None
    stopped_word: bool | None = None
    stopped_limit: bool | None = None


class SlotSaved(_Answer):
    n_saved: int
    n_written: int = 0


class SlotRestored(_Answer):
    n_restored: int
    n_read: int = 0


class Slot(_Answer):
    id: int
    is_processing: bool = True


# ----- OpenAI-compatible -------------------------------------------------------------------------


class Choice(_Answer):
    text: str
    index: int = 0
    finish_reason: str | None = None  # "stop", "length"
    stop_reason: int | str | None = None  # vLLM: the stop string or token id; None for the end token


class PromptDetails(_Answer):
    cached_tokens: int | None = None


class Usage(_Answer):
    prompt_tokens: int | None = Field(None, ge=0)
    completion_tokens: int | None = Field(None, ge=0)
    prompt_tokens_details: PromptDetails | None = None


class OpenAiCompletion(_Answer):
    """`POST /v1/completions`."""

    choices: list[Choice]
    usage: Usage | None = None


class Version(_Answer):
    """vLLM's `GET /version`."""

    version: str
