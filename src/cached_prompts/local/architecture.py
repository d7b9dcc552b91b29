"""What a model keeps in memory for a sequence, read when it loads, and which models cannot
be served at all.

The prelude cache reuses, trims and shares sequence states. How far that works depends on
the model's memory:
  - STANDARD: a KV cache, one cell per position. Any prefix can be kept (`llama_memory_seq_rm`)
    and shared between sequences (`llama_memory_seq_cp` of a position range).
  - SWA: a KV cache where some layers attend only to the last `n_swa` positions (Gemma 2/3).
    llama.cpp may reuse the cells of positions outside a sequence's window, so a trimmed or
    partly copied state must be checked to still hold the window its next token needs.
  - RECURRENT (Mamba, RWKV): one state per sequence, the result of all its positions. It
    cannot be cut back to an earlier position, and `llama_memory_seq_cp` copies it whole
    whatever range is asked for.
  - HYBRID (Jamba, LFM2, Qwen3.5-style): attention layers with a KV cache plus recurrent
    layers; the recurrent part decides: no partial trims or copies either.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from cached_prompts.errors import ModelError

ARCHITECTURE_KEY = "general.architecture"
_META_BUFFER = 256
_HEADER_READ_LIMIT = 1 << 20  # general.architecture comes first in every GGUF writer we know


class MemoryKind(str, enum.Enum):
    STANDARD = "standard"
    SWA = "swa"
    RECURRENT = "recurrent"
    HYBRID = "hybrid"

    @property
    def trims(self) -> bool:
        """Whether a sequence's state can be cut back to (or copied up to) any earlier position."""
        return self in (MemoryKind.STANDARD, MemoryKind.SWA)


@dataclass(frozen=True)
class Architecture:
    """What the loaded model is, as far as serving it goes."""

    name: str  # GGUF general.architecture, e.g. "llama", "gemma3", "mamba"
    memory: MemoryKind
    n_swa: int  # sliding-window size of the SWA layers; 0 without
    n_layer: int
    n_ctx_train: int

    def shortest_cut(self, length: int) -> int:
        """The fewest of a stored state's `length` positions that a sequence can keep (trim
        back to, or copy up to) and be continued from.

        llama_state_seq_get_data leaves out sliding-window cells outside the window of the
        sequence's last position, so a stored SWA state longer than the window holds only its
        last n_swa positions; a sequence keeping k positions goes on at position k, which
        attends to positions k - n_swa + 1 onwards: all there only for k >= length - 1. A
        recurrent state cannot be cut at all."""
        if not self.memory.trims:
            return length
        if self.memory is MemoryKind.SWA and length > self.n_swa:
            return length - 1
        return 0


def read_architecture(model: llama_cpp.llama_model_p) -> Architecture:
    """The loaded model's architecture; raises ModelError for a model this tool cannot serve."""
    name = meta_string(model, ARCHITECTURE_KEY) or "unknown"
    n_swa = int(llama_cpp.llama_model_n_swa(model))
    if llama_cpp.llama_model_is_hybrid(model):
        memory = MemoryKind.HYBRID
    elif llama_cpp.llama_model_is_recurrent(model):
        memory = MemoryKind.RECURRENT
    elif n_swa > 0:
        memory = MemoryKind.SWA
    else:
        memory = MemoryKind.STANDARD
    architecture = Architecture(name, memory, n_swa, int(llama_cpp.llama_model_n_layer(model)),
                                int(llama_cpp.llama_model_n_ctx_train(model)))
    problem = _unservable(model)
    if problem:
        raise ModelError(f"the model's architecture '{name}' is {problem}; cached-prompts serves "
                         "decoder-only text generation models (e.g. Llama, Qwen, Gemma, Mistral, Mamba)")
    return architecture


def _unservable(model: llama_cpp.llama_model_p) -> str | None:
    if llama_cpp.llama_model_has_encoder(model):
        return "an encoder-decoder (or encoder-first) model, whose prompt goes through an encoder"
    if not llama_cpp.llama_model_has_decoder(model):
        return "an encoder-only model, which generates no text"
    if llama_cpp.llama_model_is_diffusion(model):
        return "a diffusion model, which does not generate text token by token"
    if llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)) <= 0:
        return "a model without a vocabulary"
    return None


def check_causal(context: llama_cpp.llama_context_p, architecture: Architecture) -> None:
    """Refuse a context whose attention is not causal: an embedding model, which has no logits
    to sample from."""
    if not llama_cpp.llama_get_causal_attn(context):
        raise ModelError(f"the model's architecture '{architecture.name}' is an embedding model (non-causal "
                         "attention), which generates no text; use a text generation model")


def meta_string(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """A GGUF metadata value of the loaded model as text, or None if it has no such key."""
    buffer = ctypes.create_string_buffer(_META_BUFFER)
    size = llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buffer, _META_BUFFER)
    if size < 0:
        return None
    if size >= _META_BUFFER:
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(model, key.encode("utf-8"), buffer, size + 1)
    return buffer.value.decode("utf-8", errors="replace")


# ----- the architecture of a file llama.cpp would not load ---------------------------------

_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path) -> str | None:
    """general.architecture from a GGUF file's header, read without llama.cpp (which refuses
    to load an architecture it does not know); None if it cannot be found in the first MiB."""
    try:
        with path.open("rb") as handle:
            header = handle.read(_HEADER_READ_LIMIT)
    except OSError:
        return None
    reader = _HeaderReader(header)
    try:
        if reader.take(4) != b"GGUF" or reader.unpack("<I") < 2:
            return None
        reader.unpack("<Q")  # tensor count
        for _ in range(reader.unpack("<Q")):
            key = reader.string()
            kind = reader.unpack("<I")
            if key == ARCHITECTURE_KEY and kind == _GGUF_STRING:
                return reader.string()
            reader.skip_value(kind)
    except (ValueError, struct.error, UnicodeDecodeError):
        return None
    return None


class _HeaderReader:
    """Bounded reads from the start of a GGUF file; ValueError past the bytes it has."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.at + size > len(self.data):
            raise ValueError("past the end of the header read")
        chunk = self.data[self.at:self.at + size]
        self.at += size
        return chunk

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8")

    def skip_value(self, kind: int) -> None:
        if kind == _GGUF_STRING:
            self.take(self.unpack("<Q"))
        elif kind == _GGUF_ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _GGUF_SCALAR_SIZES:
                self.take(count * _GGUF_SCALAR_SIZES[item_kind])
            else:
                for _ in range(min(count, len(self.data))):
                    self.skip_value(item_kind)
        elif kind in _GGUF_SCALAR_SIZES:
            self.take(_GGUF_SCALAR_SIZES[kind])
        else:
            raise ValueError(f"unknown GGUF value type {kind}")
