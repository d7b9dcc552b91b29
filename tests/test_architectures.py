"""The engine on models other than the default Llama-architecture SmolLM2: sliding-window
attention (Gemma 3 270M, real), recurrent (Mamba) and hybrid (Jamba) memory (tiny random models
written by model_fixtures.py), and models that cannot be served (T5, BERT, an unknown architecture).

Each checks what the cache promises: cached == uncached outputs, a prelude built on a cached
one, N outputs side by side, and that nothing aborts the process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cached_prompts.local.architecture import MemoryKind, gguf_architecture
from cached_prompts.backend.interface import PreludeSource, reusable_length
from cached_prompts.cache.store import StateSettings
from cached_prompts.local.engine import LLAMA_CPP_VERSION, Model, compute_setup, resolve_gpu_layers
from cached_prompts.errors import ModelError, StateUnusableError
from cached_prompts.local.backend import LocalBackend
from cached_prompts.options import EngineOptions, SamplingOptions

from .conftest import PRELUDE, generate, generate_many, prompt_for
from .model_fixtures import gemma3_270m_or_missing, write_bert, write_jamba, write_mamba, write_t5

GREEDY = SamplingOptions(temperature=0.0, max_tokens=8)
SAMPLED = SamplingOptions(max_tokens=8)
SEEDS = [1, 2, 3]
Backends = Callable[..., LocalBackend]


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """`backends(model, cache=None)`: local backends on a model, closed after the module."""
    made: list[LocalBackend] = []

    def make(model: Path, cache: Path | None = None) -> LocalBackend:
        backend = LocalBackend(EngineOptions(model_path=str(model), n_ctx=1024, n_batch=256), cache, n_parallel=4)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


# ----- Gemma 3: sliding-window attention ------------------------------------------------------

GEMMA_WORDS = [("яблоко", "Круглый плод яблони с хрустящей мякотью."),
               ("река", "Естественный водный поток, текущий в русле."),
               ("книга", "Сшитые листы с текстом в переплёте."), ("город", "Крупный населённый пункт."),
               ("окно", "Проём в стене для света и воздуха."), ("стол", "Мебель с ровной поверхностью на ножках."),
               ("снег", "Белые кристаллы льда, падающие зимой."), ("мост", "Сооружение для перехода через реку.")]


def gemma_turn(word: str, answer: str | None = None) -> str:
    text = f"<start_of_turn>user\n{word}<end_of_turn>\n<start_of_turn>model\n"
    return text if answer is None else text + answer + "<end_of_turn>\n"


GEMMA_SYSTEM = gemma_turn("Ты — краткий толковый словарь русского языка. На каждое слово отвечай одним "
                          "предложением.", "Хорошо.")
# Three rounds of examples: longer than the 512-token window, so the window matters.
GEMMA_PRELUDE = GEMMA_SYSTEM + "".join(gemma_turn(w, a) for w, a in GEMMA_WORDS) * 3 + "<start_of_turn>user\n"
GEMMA_PROMPT = "дом<end_of_turn>\n<start_of_turn>model\n"
GEMMA_SAMPLED = SamplingOptions(temperature=1.5, top_k=0, min_p=0.0, max_tokens=8)  # the model is sure of itself


@pytest.fixture(scope="module")
def gemma(backends: Backends, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalBackend]:
    """An uncached backend, one that computes and stores, and a fresh one on the same cache."""
    path = gemma3_270m_or_missing()
    cache = tmp_path_factory.mktemp("gemma-cache")
    return {"uncached": backends(path), "writer": backends(path, cache), "reader": backends(path, cache)}


def test_gemma_is_served_with_its_sliding_window(gemma: dict[str, LocalBackend]) -> None:
    backend = gemma["uncached"]
    architecture = backend.model.architecture
    assert (architecture.name, architecture.memory, architecture.n_swa) == ("gemma3", MemoryKind.SWA, 512)
    assert len(backend.prelude_tokens(GEMMA_PRELUDE, "p")) > architecture.n_swa + 64


def test_gemma_cached_outputs_equal_uncached_ones(gemma: dict[str, LocalBackend]) -> None:
    uncached = gemma["uncached"]
    prelude = uncached.prelude_tokens(GEMMA_PRELUDE, "p")
    full = uncached.joint_tokens(GEMMA_PRELUDE, GEMMA_PROMPT)
    expected = generate(uncached, prelude, full, GEMMA_SAMPLED, [None, *SEEDS], label="ru")
    assert expected[0] and any(c in expected[0] for c in "абвгдеёжзийклмнопрстуфхцчшщыэюя"), expected
    assert len(set(expected[1:])) > 1, "different seeds should give different answers"
    first = first_position(uncached)
    assert first > 0  # the window's cells only, as a restored state has them
    for name, source in (("writer", PreludeSource.COMPUTED), ("reader", PreludeSource.CACHE)):
        backend = gemma[name]
        assert generate(backend, prelude, full, GEMMA_SAMPLED, [None, *SEEDS], label="ru") == expected, name
        assert backend.counters.sources[-1] == source.value
        assert first_position(backend) == first, "a computed state must hold the cells a restored one holds"


def first_position(backend: LocalBackend) -> int:
    """The first position sequence 0 (the prelude) holds in the sliding-window layers."""
    import llama_cpp

    return llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(backend.context.handle), 0)


def test_gemma_prelude_ending_mid_word_shares_the_cached_state(gemma: dict[str, LocalBackend]) -> None:
    """"здра" + "вствуйте" tokenize jointly unlike the prelude alone: the outputs copy all but
    the prelude's last two tokens from its state (a partial copy, checked against the window),
    from the cache as without it. (The answer may differ in its last bits from the word-boundary
    split's: its tokens are the same, but evaluated in other batches and KV cells.)"""
    uncached, writer = gemma["uncached"], gemma["writer"]
    cut, rest = GEMMA_PRELUDE + "здра", "вствуйте<end_of_turn>\n<start_of_turn>model\n"
    prelude = uncached.prelude_tokens(cut, "cut")
    full = uncached.joint_tokens(cut, rest)
    assert full == uncached.joint_tokens(GEMMA_PRELUDE, "здра" + rest)
    assert reusable_length(prelude, full) == len(prelude) - 2 > uncached.model.architecture.n_swa
    expected = generate(uncached, prelude, full, GREEDY, [None, 1], label="ru-cut")
    assert generate(writer, prelude, full, GREEDY, [None, 1], label="ru-cut") == expected
    assert writer.counters.sources[-1] == PreludeSource.PREFIX.value  # built on the stored "ru"
    fresh = gemma["reader"]
    fresh.unload()
    assert generate(fresh, prelude, full, GREEDY, [None, 1], label="ru-cut") == expected
    assert fresh.counters.sources[-1] == PreludeSource.CACHE.value


def test_gemma_child_prelude_is_built_on_its_parent(gemma: dict[str, LocalBackend]) -> None:
    uncached, reader = gemma["uncached"], gemma["reader"]
    parent = reader.prelude_tokens(GEMMA_PRELUDE, "p")
    reader.prepare_prelude(parent, "ru")  # the parent's entry, stored by the writer
    extended = GEMMA_PRELUDE + "лес<end_of_turn>\n<start_of_turn>model\nМесто, где растёт много деревьев." \
                               "<end_of_turn>\n<start_of_turn>user\n"
    # Cuts into the parent's last example, 500+ tokens in: a stored sliding-window state holds
    # only its last 512 positions, too few to go on from there, so this one is computed.
    diverging = GEMMA_PRELUDE[:-60] + "Сооружение над водой.<end_of_turn>\n<start_of_turn>user\n"
    for text, source in ((extended, PreludeSource.PREFIX), (diverging, PreludeSource.COMPUTED)):
        child = reader.prelude_tokens(text, "child")
        full = reader.joint_tokens(text, GEMMA_PROMPT)
        expected = generate(uncached, uncached.prelude_tokens(text, "child"), full, GREEDY, [None, 1], label="c")
        load = reader.prepare_prelude(child, "child", store=False)
        assert load.source is source, text[-80:]
        assert (load.reused_tokens >= len(parent) - 1) if source is PreludeSource.PREFIX else not load.reused_tokens
        assert generate(reader, child, full, GREEDY, [None, 1], label="child", store=False) == expected


# ----- recurrent and hybrid: tiny random models -----------------------------------------------

TINY_MODELS = {"mamba": (write_mamba, MemoryKind.RECURRENT), "jamba": (write_jamba, MemoryKind.HYBRID)}
EXTENDED = PRELUDE + "bicycle<|im_end|>\n<|im_start|>assistant\nA vehicle.<|im_end|>\n<|im_start|>user\n"
DIVERGING = PRELUDE[:-40] + "flesh.<|im_end|>\n<|im_start|>user\n"  # shares most of PRELUDE, not all


@pytest.fixture(scope="module", params=sorted(TINY_MODELS))
def tiny(request: pytest.FixtureRequest, backends: Backends, model_path: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, LocalBackend]:
    writer, _ = TINY_MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    path = writer(folder / f"{request.param}.gguf", model_path)
    cache = folder / "cache"
    return {"kind": request.param, "uncached": backends(path), "writer": backends(path, cache),
            "reader": backends(path, cache)}


def test_tiny_model_memory_kind_is_read_at_load(tiny: dict) -> None:
    assert tiny["uncached"].model.architecture.memory is TINY_MODELS[tiny["kind"]][1]
    assert not tiny["uncached"].model.architecture.memory.trims


def test_recurrent_cached_outputs_equal_uncached_ones(tiny: dict) -> None:
    uncached = tiny["uncached"]
    prelude = uncached.prelude_tokens(PRELUDE, "p")
    fulls = [uncached.joint_tokens(PRELUDE, prompt_for(w)) for w in ("river", "library")]
    expected = generate_many(uncached, prelude, fulls, SAMPLED, [[None, *SEEDS], [None, 4]])
    assert len(set(expected[0][1:])) > 1
    for name, source in (("writer", PreludeSource.COMPUTED), ("reader", PreludeSource.CACHE)):
        backend = tiny[name]
        assert generate_many(backend, prelude, fulls, SAMPLED, [[None, *SEEDS], [None, 4]]) == expected, name
        assert backend.counters.sources[-1] == source.value


def test_recurrent_outputs_each_decode_from_their_own_state(tiny: dict) -> None:
    """N outputs decoded side by side, each from its own copy of the prompt's state, are
    what each gives decoded alone: no output's tokens leak into another's state."""
    backend = tiny["uncached"]
    prelude = backend.prelude_tokens(PRELUDE, "p")
    full = backend.joint_tokens(PRELUDE, prompt_for("river"))
    together = generate(backend, prelude, full, SAMPLED, SEEDS)
    assert [generate(backend, prelude, full, SAMPLED, [seed])[0] for seed in SEEDS] == together


def test_recurrent_state_is_reused_only_at_its_stored_length(tiny: dict) -> None:
    uncached, reader = tiny["uncached"], tiny["reader"]
    parent = reader.prelude_tokens(PRELUDE, "p")
    reader.prepare_prelude(parent, "p")
    # Extending the parent: its whole state is reused.
    child = reader.prelude_tokens(EXTENDED, "child")
    load = reader.prepare_prelude(child, "child")
    assert (load.source, load.reused_tokens) == (PreludeSource.PREFIX, len(parent) - 1)
    # Diverging inside the parent: a recurrent state cannot be cut back, so it is computed.
    diverging = reader.prelude_tokens(DIVERGING, "diverging")
    assert diverging[:30] == parent[:30] and diverging[:len(parent) - 1] != parent[:-1]
    assert reader.prepare_prelude(diverging, "diverging").source is PreludeSource.COMPUTED
    for text, tokens in ((EXTENDED, child), (DIVERGING, diverging)):
        full = reader.joint_tokens(text, prompt_for("river"))
        expected = generate(uncached, uncached.prelude_tokens(text, "x"), full, GREEDY, [None, 1], label="x")
        assert generate(reader, tokens, full, GREEDY, [None, 1], label="x") == expected


def test_recurrent_prelude_ending_mid_word_is_decoded_whole(tiny: dict) -> None:
    """The joint tokens keep only part of the prelude's state: a recurrent output cannot start
    from part of it, so its branch decodes all its tokens; the answer is the same."""
    uncached, reader = tiny["uncached"], tiny["reader"]
    full = uncached.joint_tokens(PRELUDE, prompt_for("river"))
    expected = generate(uncached, uncached.prelude_tokens(PRELUDE, "p"), full, GREEDY, [None, 1])
    cut = PRELUDE + "riv"
    prelude = reader.prelude_tokens(cut, "cut")
    assert reader.joint_tokens(cut, prompt_for("river")[3:]) == full
    assert reusable_length(prelude, full) < len(prelude) - 1
    before = reader.counters.prompt_tokens
    assert generate(reader, prelude, full, GREEDY, [None, 1], label="cut") == expected
    assert reader.counters.prompt_tokens - before == len(full)


def test_recurrent_state_refuses_partial_trims_and_copies(tiny: dict) -> None:
    backend = tiny["uncached"]
    prelude = backend.prelude_tokens(PRELUDE, "p")
    backend.prepare_prelude(prelude, "p")
    context, body = backend.context, len(prelude) - 1
    with pytest.raises(StateUnusableError):
        context.seq_copy(0, 1, body - 5)
    with pytest.raises(StateUnusableError):
        context.seq_trim(0, body - 5)
    context.seq_copy(0, 1, body)  # the whole state: fine
    assert context.seq_length(1) == body
    backend.unload()


# ----- models that cannot be served -----------------------------------------------------------

def test_an_encoder_decoder_model_is_refused_at_load(model_path: Path, tmp_path: Path) -> None:
    path = write_t5(tmp_path / "t5.gguf", model_path)
    with pytest.raises(ModelError, match="architecture 't5' is an encoder-decoder"):
        Model(path)


def test_an_embedding_model_is_refused_at_load(model_path: Path, tmp_path: Path) -> None:
    path = write_bert(tmp_path / "bert.gguf", model_path)
    with pytest.raises(ModelError, match="architecture 'bert' is an embedding model"):
        LocalBackend(EngineOptions(model_path=str(path), n_ctx=256), None)


def test_an_unknown_architecture_is_named_in_the_error(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "unknown.gguf"
    write_mamba(path, model_path)
    data = bytearray(path.read_bytes())
    at = data.index(b"mamba")  # general.architecture's value, the first key of the header
    data[at:at + 5] = b"zebra"
    path.write_bytes(bytes(data))
    assert gguf_architecture(path) == "zebra"
    with pytest.raises(ModelError, match="'zebra'"):
        Model(path)


# ----- GPU offload ------------------------------------------------------------------------------

def test_the_device_and_batch_sizes_are_part_of_the_cache_key(make_runner, tmp_path: Path) -> None:
    settings = dict(model_sha256="0" * 64, kv_type="f16", llama_cpp_version=LLAMA_CPP_VERSION)
    assert StateSettings(**settings, device="cpu").key() != StateSettings(**settings, device="gpu:all").key()
    gpu = resolve_gpu_layers(None) != 0
    assert compute_setup(EngineOptions())[0] == ("gpu:all" if gpu else "cpu")
    assert compute_setup(EngineOptions(n_gpu_layers=0)) == ("cpu", "512/512")
    assert compute_setup(EngineOptions(n_ctx=300, n_batch=512, n_ubatch=400))[1] == "300/300"  # as llama.cpp takes them
    # A state stored with other batch sizes is not reused: it may differ in its last bits.
    writer = make_runner(tmp_path / "cache")
    prelude = writer.prelude_tokens(PRELUDE, "p")
    writer.prepare_prelude(prelude, "p")
    other = make_runner(tmp_path / "cache", n_ubatch=64)
    assert other.prepare_prelude(prelude, "p").source is PreludeSource.COMPUTED
    same = make_runner(tmp_path / "cache")
    assert same.prepare_prelude(prelude, "p").source is PreludeSource.CACHE


def test_gpu_layers_on_a_build_without_gpu_are_refused_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        assert resolve_gpu_layers(None) == -1 and resolve_gpu_layers(3) == 3
        return
    with caplog.at_level(logging.WARNING):
        assert resolve_gpu_layers(3) == 0
    assert "built without GPU support" in caplog.text
    assert resolve_gpu_layers(None) == 0
