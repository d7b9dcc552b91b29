"""Resource-owning wrappers over llama-cpp-python's low-level API.

`Model` owns a llama_model, `Context` a llama_context with its batch, `SamplerChain` a
sampler chain. Each frees its C object on close(); none of them hides a decode behind
Python-level token bookkeeping, so the generation loop stays thin.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from .errors import ContextOverflowError, EngineError, ModelError
from .options import EngineOptions, SamplingOptions

log = logging.getLogger(__name__)

KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
MIROSTAT_M = 100
_state = {"backend": False, "verbose": False}


@llama_cpp.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if _state["verbose"]:
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def init_backend(verbose: bool) -> None:
    """Route llama.cpp's own logs to stderr with -v, to nowhere otherwise."""
    _state["verbose"] = verbose
    if not _state["backend"]:
        llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _state["backend"] = True


class Model:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.path = path
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self._model:
            raise ModelError(f"llama.cpp could not load the model {path}; check that it is a "
                             "complete GGUF file of an architecture this llama.cpp supports (-v shows why)")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._piece = ctypes.create_string_buffer(256)

    @property
    def handle(self) -> llama_cpp.llama_model_p:
        return self._model

    def tokenize(self, text: str, *, at_start: bool) -> list[int]:
        """Tokens of `text`; special tokens written in it (e.g. <|im_start|>) are parsed.

        `at_start` adds BOS when the model wants one: true for a prelude, false for a prompt.
        """
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, at_start, True)
        if count < 0:
            raise EngineError(f"tokenization needs {-count} tokens, more than expected; report this bug")
        return buffer[:count]

    def piece(self, token: int) -> bytes:
        """The bytes of one token; may be part of a UTF-8 character."""
        size = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, True)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -size, 0, True)
            return buffer.raw[:size]
        return self._piece.raw[:size]

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()


class Context:
    """A llama_context with a unified KV cache shared by up to `n_seq_max` sequences."""

    def __init__(self, model: Model, options: EngineOptions, n_seq_max: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = options.n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.n_threads = options.threads
        params.n_threads_batch = options.threads
        params.type_k = KV_TYPES[options.kv_type]
        params.type_v = KV_TYPES[options.kv_type]
        # Flash attention changes the numbers (and cache contents); it is needed for a
        # quantized V cache, and measured slower with f16 on these CPUs.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.kv_type != "f16"
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        self.model = model
        self.n_ctx = options.n_ctx
        self.n_batch = options.n_batch
        self.n_seq_max = n_seq_max
        self._ctx = llama_cpp.llama_init_from_model(model.handle, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create a context of {options.n_ctx} tokens; "
                              "try a smaller --lp-n-ctx (-v shows why)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        capacity = max(options.n_batch, n_seq_max)
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._batch_capacity = capacity
        self._ones = (ctypes.c_int32 * capacity)(*([1] * capacity))

    @property
    def handle(self) -> llama_cpp.llama_context_p:
        return self._ctx

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def seq_trim(self, seq: int, keep: int) -> None:
        """Drop positions >= keep of `seq`."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            raise EngineError(f"llama.cpp could not trim sequence {seq} to {keep} tokens")

    def seq_remove(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def seq_copy(self, source: int, target: int, end: int = -1) -> None:
        """Share `source`'s KV cells of positions < end (all with -1) with `target`;
        no data is copied."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0 if end >= 0 else -1, end)

    def decode_sequence(self, tokens: Sequence[int], start: int, seq: int = 0) -> None:
        """Decode one sequence's tokens in one call; logits are kept for the last one."""
        if len(tokens) > self._batch_capacity:
            raise EngineError(f"{len(tokens)} tokens exceed the batch size {self._batch_capacity}")
        batch = self._batch
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == last
        batch.n_tokens = len(tokens)
        self._decode()

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int]) -> None:
        """Decode one new token for each of several sequences; logits for all of them."""
        batch = self._batch
        count = len(tokens)
        if count > self._batch_capacity:
            raise EngineError(f"{count} sequences exceed the batch size {self._batch_capacity}")
        # Whole-array copies: this runs once per generated token of every sequence.
        ctypes.memmove(batch.token, (ctypes.c_int32 * count)(*tokens), 4 * count)
        ctypes.memmove(batch.pos, (ctypes.c_int32 * count)(*positions), 4 * count)
        ctypes.memmove(batch.n_seq_id, self._ones, 4 * count)
        ctypes.memset(batch.logits, 1, count)
        seq_id = batch.seq_id
        for i, seq in enumerate(seqs):
            seq_id[i][0] = seq
        batch.n_tokens = count
        self._decode()

    def _decode(self) -> None:
        code = llama_cpp.llama_decode(self._ctx, self._batch)
        if code == 1:
            raise ContextOverflowError(
                f"the context of {self.n_ctx} tokens is full; raise --lp-n-ctx or lower --max-tokens / -n")
        if code != 0:
            raise EngineError(f"llama_decode failed with code {code} (-v shows llama.cpp's log)")

    def seq_state(self, seq: int) -> bytearray:
        """The KV state of one sequence, as llama_state_seq_get_data writes it."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        data = bytearray(size)
        buffer = (ctypes.c_uint8 * size).from_buffer(data)
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq)
        if written != size:
            raise EngineError(f"llama.cpp wrote {written} of {size} state bytes")
        return data

    def set_seq_state(self, data: bytes | bytearray | memoryview, seq: int) -> None:
        size = len(data)
        if isinstance(data, bytes):  # llama.cpp only reads it: pass a pointer, do not copy
            buffer = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        else:
            buffer = (ctypes.c_uint8 * size).from_buffer(data)
        read = llama_cpp.llama_state_seq_set_data(self._ctx, buffer, size, seq)
        if read != size:
            raise EngineError(f"llama.cpp accepted {read} of {size} state bytes; the state does not "
                              "fit this context (raise --lp-n-ctx) or was made by another model")

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()


class SamplerChain:
    """A llama.cpp sampler chain built from SamplingOptions and one seed."""

    def __init__(self, model: Model, options: SamplingOptions, seed: int) -> None:
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = self._add
        if options.repeat_penalty != 1.0 or options.frequency_penalty or options.presence_penalty:
            add(llama_cpp.llama_sampler_init_penalties(
                model.n_vocab, options.repeat_last_n, options.repeat_penalty,
                options.frequency_penalty, options.presence_penalty))
        if options.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        elif options.mirostat_mode:
            add(llama_cpp.llama_sampler_init_temp(options.temperature))
            if options.mirostat_mode == 1:
                add(llama_cpp.llama_sampler_init_mirostat(
                    model.n_vocab, seed, options.mirostat_tau, options.mirostat_eta, MIROSTAT_M))
            else:
                add(llama_cpp.llama_sampler_init_mirostat_v2(seed, options.mirostat_tau, options.mirostat_eta))
        else:
            if options.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(options.top_k))
            add(llama_cpp.llama_sampler_init_top_p(options.top_p, 1))
            if options.min_p > 0:
                add(llama_cpp.llama_sampler_init_min_p(options.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(options.temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def remember(self, tokens: Sequence[int]) -> None:
        """Feed earlier tokens to the penalties, as if they had been sampled."""
        for token in tokens:
            llama_cpp.llama_sampler_accept(self._chain, token)

    def sample(self, context: Context, index: int) -> int:
        """Sample (and accept) a token from the logits of batch row `index`."""
        return llama_cpp.llama_sampler_sample(self._chain, context.handle, index)

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self) -> None:
        self.close()
