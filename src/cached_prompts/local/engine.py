"""Resource-owning wrappers over llama-cpp-python's low-level API.

`Model` owns a llama_model, `Context` a llama_context, `Batch` a llama_batch (the sampler
chain's owner is local/sampler.py). Each frees its C object on close(); none of them hides a decode behind
Python-level token bookkeeping, so the generation loop stays thin.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from cached_prompts.cache.store import StateSettings
from cached_prompts.local.architecture import Architecture, MemoryKind, check_causal, gguf_architecture, read_architecture
from cached_prompts.errors import (ContextOverflowError, EngineError, ModelError, OptionsError,
                     StateUnusableError)
from cached_prompts.options import EngineOptions

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class KvLayout:
    """What one --kv-type means to llama.cpp: the K and V cache types and flash attention."""

    type_k: int
    type_v: int
    flash_attention: bool


# llama.cpp needs flash attention for a quantized V cache; a quantized K alone works without
# it. On the CPUs measured here flash attention decodes slower, so "q8_0-keys" (K in q8_0,
# V in f16, no flash attention) is the fastest there, and "q8_0" the smallest cache.
KV_LAYOUTS = {
    "f16": KvLayout(llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16, flash_attention=False),
    "q8_0": KvLayout(llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0, flash_attention=True),
    "q8_0-keys": KvLayout(llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_F16, flash_attention=False),
}
LLAMA_CPP_VERSION: str = llama_cpp.__version__
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


def resolve_gpu_layers(requested: int | None, *, warn: bool = True) -> int:
    """Layers to offload (-1 = all): the option, else all when this llama.cpp can offload."""
    can_offload = bool(llama_cpp.llama_supports_gpu_offload())
    if requested is None:
        return -1 if can_offload else 0
    if requested != 0 and not can_offload:
        if warn:
            log.warning("--lp-n-gpu-layers %d is ignored: this llama-cpp-python was built without GPU "
                        "support or sees no GPU (see docs/models-and-devices.md, \"GPU offload\")", requested)
        return 0
    return requested


# The CPU backend's extra weight buffer types, in the order llama.cpp tries them for each weight
# (ggml-cpu.cpp): "AMX" (built only with -march supporting AMX, used where the CPU has it), then
# "CPU_REPACK" (weights rearranged for the SIMD kernels). llama.cpp's AMX matmul segfaults at the
# first decode on current Xeons (upstream issue 20824, closed unfixed), so "auto" drops the extra
# buffer types where AMX would take weights. Overrides (tensor_buft_overrides) cannot keep
# CPU_REPACK alone: an override to the CPU buffer re-selects among all extra types, AMX first,
# and one straight to CPU_REPACK skips its support check and aborts on tensors it cannot repack.
AMX_BUFFER_TYPE = "AMX"


def cpu_weight_buffer_types() -> list[str]:
    """Names of the CPU backend's extra weight buffer types on this machine, in llama.cpp's order."""
    from llama_cpp._ggml import libggml  # llama-cpp-python's handle on ggml; no model needed

    by_type = libggml.ggml_backend_dev_by_type
    by_type.restype, by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
    reg_of = libggml.ggml_backend_dev_backend_reg
    reg_of.restype, reg_of.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    proc = libggml.ggml_backend_reg_get_proc_address
    proc.restype, proc.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]
    name_of = libggml.ggml_backend_buft_name
    name_of.restype, name_of.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    device = by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    address = proc(reg_of(device), b"ggml_backend_dev_get_extra_bufts") if device else None
    if not address:
        return []
    listing = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
    names = []
    for index in range(16):  # a NULL-terminated array of a few entries
        if not listing or not listing[index]:
            break
        names.append(name_of(listing[index]).decode("utf-8", "replace"))
    return names


def resolve_repack(choice: str) -> bool:
    """Whether weights go into the CPU's extra buffer types (repacked): `on`, `off`, or `auto`:
    on unless AMX would take them (where llama.cpp crashes)."""
    if choice == "on":
        return True
    if choice == "off":
        return False
    return AMX_BUFFER_TYPE not in cpu_weight_buffer_types()


def state_settings(options: EngineOptions, model_sha256: str) -> StateSettings:
    """The cache key's settings of a state computed with `options` (the one place they are built)."""
    device, batching = compute_setup(options)
    weights = "repacked" if resolve_repack(options.repack) else "plain"
    return StateSettings(model_sha256=model_sha256, kv_type=options.kv_type, llama_cpp_version=LLAMA_CPP_VERSION,
                         device=device, batching=batching, weights=weights)


def compute_setup(options: EngineOptions) -> tuple[str, str]:
    """(device, batching) of a state's cache key, known without loading the model.

    A state computed on a GPU differs in its last bits from one computed on the CPU, and some
    kernels (e.g. repacked Q4_K on x86 CPUs) give a token's keys and values other last bits in
    other batch shapes, so both are part of the key. Batch sizes as llama.cpp takes them:
    n_batch lowered to n_ctx, n_ubatch to n_batch."""
    layers = resolve_gpu_layers(options.n_gpu_layers, warn=False)
    device = "cpu" if layers == 0 else "gpu:all" if layers < 0 else f"gpu:{layers}"
    n_batch = min(options.n_batch, options.n_ctx)
    return device, f"{n_batch}/{min(options.ubatch, n_batch)}"


class Model:
    """A loaded GGUF model, its vocabulary and its architecture."""

    def __init__(self, path: Path, n_gpu_layers: int | None = None, *, repack: bool | None = None) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        # None: as `--lp-repack auto` (no repacking where AMX would take the weights)
        params.use_extra_bufts = resolve_repack("auto") if repack is None else repack
        self.path = path
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self._model:
            name = gguf_architecture(path)
            what = f"an architecture ('{name}') this llama.cpp supports" if name else "a supported architecture"
            raise ModelError(f"llama.cpp could not load the model {path}; check that it is a complete "
                             f"GGUF file of {what} (-v shows llama.cpp's reason)")
        try:
            self.architecture: Architecture = read_architecture(self._model)
        except ModelError:
            self.close()
            raise
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

    @property
    def bos(self) -> int:
        """The beginning-of-sequence token (-1 if the vocabulary has none)."""
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    @property
    def adds_bos(self) -> bool:
        """Whether tokenize(at_start=True) puts the BOS token in front of the text."""
        return bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))

    def is_special(self, token: int) -> bool:
        """Whether `token` is a control or user-defined token (a turn marker, not text)."""
        special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        return bool(llama_cpp.llama_vocab_get_attr(self.vocab, token) & special)

    def chat_template(self) -> str | None:
        """The model's own chat template (GGUF `tokenizer.chat_template`), if it has one."""
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return template.decode("utf-8", errors="replace") if template else None

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()


def check_context_limits(options: EngineOptions, n_seq_max: int) -> None:
    """Refuse what llama.cpp would abort on (GGML_ASSERT) instead of returning an error.

    llama_init_from_model reserves one output row per sequence in a buffer of
    min(n_ctx, n_batch) rows and asserts that they fit; llama_decode asserts that a batch has
    at most n_batch tokens, and a decode step has one token per sequence."""
    if n_seq_max > llama_cpp.llama_max_parallel_sequences():
        raise EngineError(f"{n_seq_max} sequences exceed llama.cpp's limit of "
                          f"{llama_cpp.llama_max_parallel_sequences()}; report this bug")
    if options.n_batch < n_seq_max:
        raise OptionsError(f"--lp-n-batch {options.n_batch} is too small: every decode step takes one token "
                           f"for each of up to {n_seq_max} sequences; use --lp-n-batch {n_seq_max} or more")
    if options.n_ctx < n_seq_max:
        raise OptionsError(f"--lp-n-ctx {options.n_ctx} is too small for {n_seq_max} sequences decoded "
                           f"side by side; use --lp-n-ctx {n_seq_max} or more")


class Batch:
    """A llama_batch of up to `capacity` tokens with one sequence id each; freed on close()."""

    def __init__(self, capacity: int) -> None:
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._owned = True
        self.capacity = capacity
        self._ones = (ctypes.c_int32 * capacity)(*([1] * capacity))

    @property
    def handle(self) -> llama_cpp.llama_batch:
        return self._batch

    def set_sequence(self, tokens: Sequence[int], start: int, seq: int, *, all_logits: bool) -> None:
        """Consecutive tokens of one sequence from position `start`; logits for the last one
        (for every one with `all_logits`)."""
        if len(tokens) > self.capacity:
            raise EngineError(f"{len(tokens)} tokens exceed the batch size {self.capacity}")
        batch = self._batch
        last = len(tokens) - 1
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = all_logits or i == last
        batch.n_tokens = len(tokens)

    def set_step(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int]) -> None:
        """One token for each of several sequences; logits for all of them."""
        batch = self._batch
        count = len(tokens)
        if count > self.capacity:
            raise EngineError(f"{count} sequences exceed the batch size {self.capacity}")
        # Whole-array copies: this runs once per generated token of every sequence.
        ctypes.memmove(batch.token, (ctypes.c_int32 * count)(*tokens), 4 * count)
        ctypes.memmove(batch.pos, (ctypes.c_int32 * count)(*positions), 4 * count)
        ctypes.memmove(batch.n_seq_id, self._ones, 4 * count)
        ctypes.memset(batch.logits, 1, count)
        seq_id = batch.seq_id
        for i, seq in enumerate(seqs):
            seq_id[i][0] = seq
        batch.n_tokens = count

    def close(self) -> None:
        if self._owned:
            llama_cpp.llama_batch_free(self._batch)
            self._owned = False

    def __del__(self) -> None:
        self.close()


class Context:
    """A llama_context with a unified KV cache shared by up to `n_seq_max` sequences."""

    def __init__(self, model: Model, options: EngineOptions, n_seq_max: int) -> None:
        self._ctx = None
        check_context_limits(options, n_seq_max)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = options.ubatch
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        # Keep every position of the sliding-window layers (llama.cpp's default today, set
        # here because the cache depends on it): a smaller SWA cache drops positions a trimmed
        # or partly copied state still needs. Ignored by models without SWA.
        params.swa_full = True
        params.n_threads = options.threads
        params.n_threads_batch = options.threads
        layout = KV_LAYOUTS[options.kv_type]
        params.type_k, params.type_v = layout.type_k, layout.type_v
        # Flash attention changes the numbers (and cache contents), so it is fixed by the KV type.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if layout.flash_attention
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        self.model = model
        self.memory_kind: MemoryKind = model.architecture.memory
        self.n_swa = model.architecture.n_swa
        self.n_ctx = options.n_ctx
        self.n_seq_max = n_seq_max
        trained = model.architecture.n_ctx_train
        if 0 < trained < options.n_ctx:
            log.warning("--lp-n-ctx %d is more than the %d tokens %s was trained on; answers past %d tokens "
                        "may be poor", options.n_ctx, trained, model.path.name, trained)
        self._ctx = llama_cpp.llama_init_from_model(model.handle, params)
        if not self._ctx:
            raise EngineError(f"llama.cpp could not create a context of {options.n_ctx} tokens; "
                              "try a smaller --lp-n-ctx (-v shows why)")
        try:
            check_causal(self._ctx, model.architecture)
        except ModelError:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
            raise
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        # llama.cpp lowers n_batch to n_ctx; chunks must fit what it took.
        self.n_batch = int(llama_cpp.llama_n_batch(self._ctx))
        self._batch = Batch(self.n_batch)

    @property
    def handle(self) -> llama_cpp.llama_context_p:
        return self._ctx

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def seq_length(self, seq: int) -> int:
        """Positions 0..n-1 held by `seq`: n (0 for an empty sequence)."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq)) + 1

    def seq_trim(self, seq: int, keep: int) -> None:
        """Drop positions >= keep of `seq`. Raises StateUnusableError when the state cannot be
        cut there (a recurrent state holds only its last position) or lost the positions its
        next token attends to (sliding-window cells llama.cpp reused)."""
        length = self.seq_length(seq)
        if keep >= length:
            return
        if not self.memory_kind.trims:
            raise StateUnusableError(f"a {self.memory_kind.value} state of {length} tokens cannot be cut "
                                     f"back to {keep}")
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            raise StateUnusableError(f"llama.cpp could not trim sequence {seq} to {keep} tokens")
        self._check_whole(seq, keep)

    def discard_cells(self, seq: int, keep: int) -> None:
        """Remove `seq`'s cells at positions >= keep: the draft tokens its sampler rejected
        (generation.py). Only for memories that can be cut (`MemoryKind.trims`)."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            raise EngineError(f"llama.cpp could not remove the rejected draft cells of sequence {seq}; "
                              "report this bug (--draft off avoids it)")
        last = llama_cpp.llama_memory_seq_pos_max(self._memory, seq)
        if last != keep - 1:
            raise EngineError(f"sequence {seq} ends at position {last} after removing its rejected "
                              f"drafts, not at {keep - 1}; report this bug (--draft off avoids it)")

    def seq_remove(self, seq: int) -> None:
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1):
            raise EngineError(f"llama.cpp could not clear sequence {seq}; report this bug")

    def seq_copy(self, source: int, target: int, end: int = -1) -> None:
        """Give `target` the state of `source`'s positions < end (all with -1). KV cells are
        shared, not copied; a recurrent state is shared whole and copied when `target` is
        decoded into, so only the whole sequence can be copied."""
        length = self.seq_length(source)
        if end < 0 or end > length:
            end = length
        if end == 0:
            return
        if end < length and not self.memory_kind.trims:
            raise StateUnusableError(f"a {self.memory_kind.value} state of {length} tokens cannot be "
                                     f"copied up to {end}")
        whole = end == length
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, -1 if whole else 0, -1 if whole else end)
        self._check_whole(target, end)

    def _check_whole(self, seq: int, length: int) -> None:
        """Check that `seq` holds positions up to length - 1 and, with sliding-window layers,
        every position its next token attends to (llama.cpp reuses cells outside a window)."""
        last = llama_cpp.llama_memory_seq_pos_max(self._memory, seq)
        # A recurrent state's only position is its last one, so its pos_min says nothing.
        first = llama_cpp.llama_memory_seq_pos_min(self._memory, seq) if self.memory_kind.trims else 0
        # The next token (position `length`) attends to positions > length - n_swa.
        window_start = max(0, length - self.n_swa + 1) if self.memory_kind is MemoryKind.SWA else 0
        if last != length - 1 or first > window_start:
            raise StateUnusableError(f"sequence {seq} holds positions {first}..{last}, not the "
                                     f"{window_start}..{length - 1} it needs")

    def decode_sequence(self, tokens: Sequence[int], start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        """Decode one sequence's tokens in one call; logits are kept for the last one (for
        every one with `all_logits`: rows of `logits`, in order)."""
        self._batch.set_sequence(tokens, start, seq, all_logits=all_logits)
        self._decode()

    def prefill(self, tokens: Sequence[int], start: int, end: int, seq: int, *, all_logits: bool = False,
                after_chunk: Callable[[int, int], None] | None = None) -> None:
        """Decode tokens[start:end] into `seq` (which holds positions < start) in chunks of
        n_batch; `after_chunk(chunk_start, chunk_end)` runs after each, while its logits are there."""
        for chunk_start in range(start, end, self.n_batch):
            chunk_end = min(chunk_start + self.n_batch, end)
            self.decode_sequence(tokens[chunk_start:chunk_end], chunk_start, seq, all_logits=all_logits)
            if after_chunk is not None:
                after_chunk(chunk_start, chunk_end)

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int]) -> None:
        """Decode one new token for each of several sequences; logits for all of them."""
        self._batch.set_step(tokens, positions, seqs)
        self._decode()

    def logits(self, rows: int) -> np.ndarray:
        """The logits of the last decode's first `rows` output rows, (rows, n_vocab), a view
        valid until the next decode."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(rows, self.model.n_vocab))

    def next_token_logprobs(self, tokens: Sequence[int], first: int, end: int, seq: int) -> list[float]:
        """log P(tokens[i] | tokens[:i]) for first <= i < end: tokens[first-1:end-1] decoded
        into `seq` (which holds positions < first - 1) with logits for every row."""
        result: list[float] = []

        def read(chunk_start: int, chunk_end: int) -> None:
            rows = chunk_end - chunk_start
            logits = self.logits(rows)
            peak = logits.max(axis=1)
            log_sum = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1, dtype=np.float64))
            chosen = logits[np.arange(rows), np.array(tokens[chunk_start + 1:chunk_end + 1])]
            result.extend(float(value) for value in chosen - log_sum)

        self.prefill(tokens, first - 1, end - 1, seq, all_logits=True, after_chunk=read)
        return result

    def _decode(self) -> None:
        code = llama_cpp.llama_decode(self._ctx, self._batch.handle)
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
            self._batch.close()
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
