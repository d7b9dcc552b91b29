"""The one options model: it feeds the CLI flags, the workspace config and the REPL's
`inference_parameters`, so every entry point validates the same way.

Each field carries its CLI flag in `json_schema_extra["flag"]`; `cli.py` builds the
argparse flags from these models instead of repeating them.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Literal

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator)

from cached_prompts.errors import OptionsError

log = logging.getLogger(__name__)

KvType = Literal["f16", "q8_0", "q8_0-keys"]
Repack = Literal["auto", "on", "off"]
EngineProcess = Literal["worker", "in-process"]
Draft = Literal["auto", "off"]
DEFAULT_CACHE_MAX_SIZE = "4G"
# llama.cpp's limits on the context parameters (llama-context.cpp, ggml.h):
MIN_N_CTX = 16  # (engine.Context also checks n_ctx and n_batch against the sequences it decodes)
MAX_N_CTX = 1 << 30  # positions are int32 and n_ctx is padded to 256 as a uint32
DEFAULT_MAX_N_UBATCH = 512
MAX_THREADS = 512  # GGML_MAX_N_THREADS; far more threads than that crash ggml
# One rule for every source (flags, cached-prompts.toml, REPL parameters): numbers are finite.
# `--lp-temp inf` or `temperature = inf` would otherwise reach llama.cpp and the records (not JSON).
ALLOW_INF_NAN = False
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of a size like `4096`, `500M`, `2G`, `1.5GiB` (K, M, G, T are powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size; write bytes or a number with K, M, G or T "
                         "(powers of 1024), e.g. 500M or 2G")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


_WARNED: set[tuple[str, Any]] = set()


def _warn_once(option: str, value: Any, message: str, *args: Any) -> None:
    """Options are validated again for every REPL request: say each thing once per process."""
    if (option, value) not in _WARNED:
        _WARNED.add((option, value))
        log.warning(message, *args)


def _flag(flag: str, help_text: str, **extra: Any) -> dict[str, Any]:
    return {"flag": flag, "help": help_text, **extra}


class SamplingOptions(BaseModel):
    """How answers are sampled; may change per request."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, allow_inf_nan=ALLOW_INF_NAN)

    temperature: float = Field(
        0.8, ge=0.0, validation_alias=AliasChoices("temperature", "temp"),
        json_schema_extra=_flag("--lp-temp", "sampling temperature; 0 = greedy"))
    top_k: int = Field(40, ge=0, json_schema_extra=_flag("--lp-top-k", "top-k; 0 = off"))
    top_p: float = Field(0.95, gt=0.0, le=1.0, json_schema_extra=_flag("--lp-top-p", "top-p (nucleus)"))
    min_p: float = Field(0.05, ge=0.0, le=1.0, json_schema_extra=_flag("--lp-min-p", "min-p; 0 = off"))
    repeat_penalty: float = Field(
        1.1, gt=0.0, json_schema_extra=_flag("--lp-repeat-penalty", "repetition penalty; 1 = off"))
    repeat_last_n: int = Field(
        64, ge=0, json_schema_extra=_flag("--lp-repeat-last-n", "tokens the penalties look back on"))
    frequency_penalty: float = Field(
        0.0, json_schema_extra=_flag("--lp-frequency-penalty", "frequency penalty"))
    presence_penalty: float = Field(
        0.0, json_schema_extra=_flag("--lp-presence-penalty", "presence penalty"))
    mirostat_mode: Literal[0, 1, 2] = Field(
        0, json_schema_extra=_flag("--lp-mirostat-mode", "mirostat: 0 = off, 1 or 2 = version"))
    mirostat_tau: float = Field(5.0, gt=0.0, json_schema_extra=_flag("--lp-mirostat-tau", "mirostat target entropy"))
    mirostat_eta: float = Field(0.1, gt=0.0, json_schema_extra=_flag("--lp-mirostat-eta", "mirostat learning rate"))
    tfs_z: float | None = Field(
        None, json_schema_extra=_flag("--lp-tfs-z", "accepted for compatibility; llama.cpp removed tail-free sampling"))
    seed: int = Field(
        0, ge=0, lt=2**32,
        json_schema_extra=_flag("--seed", "base seed; output K uses a seed derived from it and K"))
    max_tokens: int = Field(
        256, ge=1, json_schema_extra=_flag("--max-tokens", "most tokens per answer"))
    stop: list[str] = Field(
        default_factory=list,
        json_schema_extra=_flag("--stop", "stop string (repeatable); not included in the answer", repeatable=True))

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("an empty stop string would stop at once; remove it")
        return value

    @field_validator("tfs_z")
    @classmethod
    def _warn_tfs_z(cls, value: float | None) -> float | None:
        if value is not None and value != 1.0:
            _warn_once("tfs_z", value, "tfs_z=%s is ignored: llama.cpp no longer has tail-free sampling", value)
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 and self.mirostat_mode == 0

    def as_greedy(self) -> "SamplingOptions":
        return self.model_copy(update={"temperature": 0.0, "mirostat_mode": 0})


class EngineOptions(BaseModel):
    """Which model and how its context is built; fixed for a process."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=ALLOW_INF_NAN)

    model_path: str | None = Field(
        None, json_schema_extra=_flag(
            "--lp-model-path", "GGUF model file (default: $CACHED_PROMPTS_MODEL, then "
            "model_path in cached-prompts.toml, then the embedded SmolLM2-135M-Instruct)"))
    # The bounds are llama.cpp's own limits (see engine.py): a value beyond them would make
    # llama.cpp abort the process instead of returning an error.
    n_ctx: int = Field(4096, ge=MIN_N_CTX, le=MAX_N_CTX,
                       json_schema_extra=_flag("--lp-n-ctx", "context length in tokens"))
    n_threads: int | None = Field(
        None, ge=1, le=MAX_THREADS, json_schema_extra=_flag("--n_threads", "CPU threads (default: all cores)"))
    n_batch: int = Field(
        512, ge=1, le=MAX_N_CTX,
        json_schema_extra=_flag("--lp-n-batch", "most tokens per llama_decode call; at least one per "
                                                "sequence decoded side by side (17)"))
    n_ubatch: int | None = Field(
        None, ge=1, le=MAX_N_CTX,
        json_schema_extra=_flag("--lp-n-ubatch", "most tokens llama.cpp computes at once inside a decode call "
                                                 "(default: n_batch, at most 512); at most n_batch"))
    n_gpu_layers: int | None = Field(
        None, ge=-1, le=2**31 - 1,
        json_schema_extra=_flag("--lp-n-gpu-layers", "layers offloaded to the GPU; -1 = all (default: all "
                                                     "when this llama.cpp build can offload, else 0)"))
    kv_type: KvType = Field(
        "f16", json_schema_extra=_flag("--kv-type", "KV cache type: f16, q8_0 (K and V in q8_0 with flash attention: "
                                                "smallest cache files) or q8_0-keys (K in q8_0: fastest on CPUs)"))
    repack: Repack = Field(
        "auto", json_schema_extra=_flag(
            "--lp-repack", "weights in llama.cpp's repacked CPU layouts: on, off, or auto (on, except where "
                           "the CPU has AMX: llama.cpp's AMX path crashes there)"))
    engine_process: EngineProcess = Field(
        "worker", json_schema_extra=_flag(
            "--lp-engine-process", "worker: llama.cpp runs in a process of its own, so that a crash inside it "
                                   "is an error and the engine starts again (docs/robustness.md); in-process: "
                                   "in this process (a crash there ends the run)"))
    draft: Draft = Field(
        "auto", json_schema_extra=_flag(
            "--draft", "n-gram draft tokens verified in the same decode (lookup speculative decoding, "
                       "local engine): auto (where they pay) or off; see docs/drafts.md"))
    cache_max_size: str = Field(
        DEFAULT_CACHE_MAX_SIZE, json_schema_extra=_flag(
            "--cache-max-size", "largest total size of llm_cache/, in bytes or with K, M, G, T "
            "(500M, 2G); least recently used entries are evicted beyond it"))
    follow_links_outside: bool = Field(
        False, json_schema_extra=_flag(
            "--follow-links-outside", "follow symbolic links in the workspace (inputs, a preludes/ folder) that "
                                      "lead outside it; by default only links to files inside it are read, since "
                                      "a workspace may come from someone else"))
    # No global flag: `outputs-for-drafts` and `outputs-test-prompts` set it with their own --report.
    report: bool = Field(
        False, json_schema_extra={"help": "refresh report.html at the end of outputs-for-drafts and "
                                          "outputs-test-prompts (their --report flag)"})

    @field_validator("cache_max_size", mode="before")
    @classmethod
    def _check_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError("a size like 500M or 2G (or a number of bytes)")
        parse_size(value)
        return value.strip()

    @property
    def cache_max_bytes(self) -> int:
        return parse_size(self.cache_max_size)

    @field_validator("n_ubatch")
    @classmethod
    def _ubatch_within_batch(cls, value: int | None, info: ValidationInfo) -> int | None:
        n_batch = info.data.get("n_batch")
        if value is not None and n_batch is not None and value > n_batch:
            raise ValueError(f"must not exceed n_batch ({n_batch}): lower --lp-n-ubatch or raise --lp-n-batch")
        return value

    @field_validator("n_threads")
    @classmethod
    def _warn_more_threads_than_cores(cls, value: int | None) -> int | None:
        cores = os.cpu_count() or 1
        if value is not None and value > cores:
            _warn_once("n_threads", value, "n_threads=%d is more than the %d cores of this machine: the "
                       "threads would wait on each other and run many times slower; use at most %d",
                       value, cores, cores)
        return value

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1

    @property
    def ubatch(self) -> int:
        """n_ubatch, or its default: n_batch up to 512 (llama.cpp's own default)."""
        return self.n_ubatch if self.n_ubatch is not None else min(self.n_batch, DEFAULT_MAX_N_UBATCH)


ServerApiName = Literal["auto", "llama", "openai"]
SERVER_ENV = "CACHED_PROMPTS_SERVER"
DEFAULT_SERVER_TIMEOUT = 600.0


def normalize_server_url(value: str) -> str:
    """`http(s)://host[:port][/path]` without a trailing slash; anything else is refused."""
    import httpx

    text = value.strip().rstrip("/")
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError) as error:
        raise ValueError(f"{value!r} is not a URL ({error})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{value!r} is not a server URL; write it as http://HOST:PORT, "
                         "e.g. http://127.0.0.1:8080")
    if url.query or url.fragment:
        raise ValueError(f"{value!r}: a server URL has no ?query or #fragment")
    return text


class ServerOptions(BaseModel):
    """Servers that tokenize and generate instead of the local engine (none: the local engine)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=ALLOW_INF_NAN)

    servers: list[str] = Field(
        default_factory=list,
        json_schema_extra=_flag(
            "--server", "URL of a llama-server or OpenAI-compatible (vLLM) server; repeatable "
            f"(default: ${SERVER_ENV}, comma-separated, then servers in cached-prompts.toml); "
            "none: the local engine", repeatable=True))
    server_api: ServerApiName = Field(
        "auto", json_schema_extra=_flag(
            "--server-api", "auto: llama-server if it answers /props, else OpenAI-compatible "
            "/v1/completions"))
    server_timeout: float = Field(
        DEFAULT_SERVER_TIMEOUT, gt=0.0, json_schema_extra=_flag(
            "--server-timeout", "seconds a server may take to answer one request before it counts as down"))
    server_parallel: int | None = Field(
        None, ge=1, json_schema_extra=_flag(
            "--server-parallel", "outputs in flight per server (default: llama-server's slots from "
            "/props; 8 for OpenAI-compatible servers)"))

    @field_validator("servers", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("servers")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(normalize_server_url(url) for url in value))


OPTION_MODELS: tuple[type[BaseModel], ...] = (EngineOptions, SamplingOptions, ServerOptions)
SERVER_KEYS = frozenset(ServerOptions.model_fields)


def server_options(config: dict[str, Any], flags: dict[str, Any], where: str,
                   environ: dict[str, str] | None = None) -> ServerOptions:
    """The server options of a run: flags, then `$CACHED_PROMPTS_SERVER` (servers only), then
    the workspace config. Keys of other models are ignored here."""
    values = {k: v for k, v in config.items() if k in SERVER_KEYS}
    env = (os.environ if environ is None else environ).get(SERVER_ENV, "")
    if env.strip():
        values["servers"] = env
    values.update({k: v for k, v in flags.items() if k in SERVER_KEYS})
    return build_options(ServerOptions, values, where)


MAX_SHOWN_INPUT = 200  # characters of a bad value shown in a message (a server may send megabytes)


def describe_validation_error(error: ValidationError, where: str) -> str:
    parts = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]) or "(value)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown option '{name}'")
        else:
            shown = repr(item.get("input"))
            shown = shown if len(shown) <= MAX_SHOWN_INPUT else shown[:MAX_SHOWN_INPUT] + "..."
            parts.append(f"'{name}': {item['msg']} (got {shown})")
    return f"{where}: " + "; ".join(parts)


def build_options(model: type[BaseModel], values: dict[str, Any], where: str) -> Any:
    """Validate `values` into `model`, raising OptionsError that names each bad key."""
    try:
        return model.model_validate(values)
    except ValidationError as error:
        raise OptionsError(describe_validation_error(error, where)) from None


def split_by_model(values: dict[str, Any], where: str) -> tuple[EngineOptions, SamplingOptions]:
    """Split one flat mapping (CLI or config) into the two option models."""
    engine_keys = set(EngineOptions.model_fields)
    sampling_keys = set(SamplingOptions.model_fields) | {"temp"}
    unknown = sorted(set(values) - engine_keys - sampling_keys - SERVER_KEYS)  # servers: server_options()
    if unknown:
        raise OptionsError(f"{where}: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
                           f"known: {', '.join(sorted(engine_keys | sampling_keys))}")
    engine = build_options(EngineOptions, {k: v for k, v in values.items() if k in engine_keys}, where)
    sampling = build_options(SamplingOptions, {k: v for k, v in values.items() if k in sampling_keys}, where)
    return engine, sampling


def derive_seed(base_seed: int, output_index: int) -> int:
    """Seed of output K: stable, distinct per K, independent of how many outputs are made."""
    x = (base_seed * 0x9E3779B97F4A7C15 + output_index + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0xFFFFFFFF
