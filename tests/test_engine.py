"""The local engine on the real model: cached and uncached outputs alike, reuse of a cached
prefix, entry sizes, the model's identity, context limits, stop strings and the text of the
answers (characters split across tokens)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cached_prompts.errors import ContextOverflowError, InputFileError
from cached_prompts.local.generation import TextCollector
from cached_prompts.options import SamplingOptions

from .conftest import GREEDY, PRELUDE, SAMPLED, generate, prompt_for

RAW_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 2  # layers x KV heads x head dim x (K, V) x f16


def test_cached_greedy_output_is_byte_identical_to_uncached(make_runner, tmp_path: Path) -> None:
    uncached = make_runner(None)
    prelude = uncached.prelude_tokens(PRELUDE, "prelude")
    prompts = [uncached.joint_tokens(PRELUDE, prompt_for(w)) for w in ("river", "library")]
    expected = [generate(uncached, prelude, p, GREEDY, [None], label="p")[0] for p in prompts]

    writer = make_runner(tmp_path / "cache")
    assert [generate(writer, prelude, p, GREEDY, [None], label="p")[0] for p in prompts] == expected
    assert writer.counters.sources == ["computed", "memory"]

    reader = make_runner(tmp_path / "cache")  # a new process would see the same files
    assert [generate(reader, prelude, p, GREEDY, [None], label="p")[0] for p in prompts] == expected
    assert reader.counters.sources == ["cache", "memory"]
    assert reader.counters.prelude_tokens_computed == 0
    assert all(expected)


def test_sampled_outputs_are_reproducible_and_independent_of_the_cache(make_runner, tmp_path: Path) -> None:
    seeds = [11, 12, 13]
    uncached = make_runner(None)
    prelude = uncached.prelude_tokens(PRELUDE, "prelude")
    prompt = uncached.joint_tokens(PRELUDE, prompt_for("river"))
    first = generate(uncached, prelude, prompt, SAMPLED, seeds, label="p")
    again = generate(uncached, prelude, prompt, SAMPLED, seeds, label="p")
    cached = make_runner(tmp_path / "cache")
    generate(cached, prelude, prompt, SAMPLED, seeds, label="p")
    from_disk = generate(make_runner(tmp_path / "cache"), prelude, prompt, SAMPLED, seeds, label="p")
    assert first == again == from_disk
    assert len(set(first)) > 1, "different seeds should give different answers"


def test_a_prelude_extending_a_cached_one_is_built_from_its_state(make_runner, tmp_path: Path) -> None:
    longer_text = PRELUDE + "bicycle<|im_end|>\n<|im_start|>assistant\nA vehicle.<|im_end|>\n<|im_start|>user\n"
    scratch = make_runner(None)
    longer = scratch.prelude_tokens(longer_text, "longer")
    prompt = scratch.joint_tokens(PRELUDE, prompt_for("river"))
    expected = generate(scratch, longer, prompt, GREEDY, [None], label="longer")

    runner = make_runner(tmp_path / "cache")
    parent = runner.prelude_tokens(PRELUDE, "parent")
    runner.prepare_prelude(parent, "parent")
    load = runner.prepare_prelude(longer, "longer")
    assert load.source == "prefix"
    assert load.reused_tokens == len(parent) - 1
    assert load.computed_tokens == len(longer) - len(parent)
    fresh = make_runner(tmp_path / "cache")
    assert generate(fresh, longer, prompt, GREEDY, [None], label="longer") == expected
    assert fresh.counters.sources == ["cache"]


def test_cache_bytes_per_token_are_within_5_percent_of_raw_kv(make_runner, tmp_path: Path) -> None:
    runner = make_runner(tmp_path / "cache")
    tokens = runner.prelude_tokens(PRELUDE * 6, "long prelude")
    runner.prepare_prelude(tokens, "long")
    entry = runner.cache.find_exact(tokens)
    per_token = entry.state_bytes / (len(tokens) - 1)
    assert RAW_KV_BYTES_PER_TOKEN <= per_token <= 1.05 * RAW_KV_BYTES_PER_TOKEN


def test_a_different_model_file_never_reuses_an_entry(make_runner, tmp_path: Path, model_path: Path) -> None:
    other_model = tmp_path / "other.gguf"
    shutil.copyfile(model_path, other_model)
    with other_model.open("ab") as handle:  # same weights, different file: a different fingerprint
        handle.write(b"\0" * 64)
    first = make_runner(tmp_path / "cache")
    prelude = first.prelude_tokens(PRELUDE, "p")
    first.prepare_prelude(prelude, "p")
    second = make_runner(tmp_path / "cache", model_path=str(other_model))
    assert second.prepare_prelude(prelude, "p").source == "computed"
    assert first.settings.key() != second.settings.key()


def test_context_limits_give_clear_errors(make_runner) -> None:
    runner = make_runner(None, n_ctx=64)
    with pytest.raises(ContextOverflowError, match=r"has \d+ tokens, the context only 64"):
        runner.prelude_tokens(PRELUDE * 3, "preludes/big.txt")
    prelude = runner.prelude_tokens("<|im_start|>user\n", "p")
    with pytest.raises(ContextOverflowError, match="prelude \\+ prompt take"):
        generate(runner, prelude, runner.joint_tokens("<|im_start|>user\n", "word " * 80), GREEDY, [None], label="p")
    with pytest.raises(InputFileError, match="is empty"):
        runner.prelude_tokens("", "preludes/empty.txt")


def test_answers_stop_at_stop_strings_and_max_tokens(make_runner) -> None:
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    prompt = runner.joint_tokens(PRELUDE, prompt_for("river"))
    full = generate(runner, prelude, prompt, GREEDY.model_copy(update={"max_tokens": 12}), [None], label="p")[0]
    word = full.split()[1]
    stopped = generate(runner, prelude, prompt, GREEDY.model_copy(update={"max_tokens": 12, "stop": [word]}),
                              [None], label="p")[0]
    assert stopped == full[: full.index(word)]
    short = generate(runner, prelude, prompt, GREEDY.model_copy(update={"max_tokens": 2}), [None], label="p")[0]
    assert full.startswith(short) and len(runner.tokenize(short, at_start=False)) <= 3


def test_text_collector_keeps_letters_split_across_tokens() -> None:
    data = "Привет, мир — ёлка".encode()
    collector = TextCollector([])
    for i in range(0, len(data), 3):  # 3-byte pieces split 2-byte Cyrillic letters
        collector.add(data[i:i + 3])
    assert collector.text == "Привет, мир — ёлка"


def test_text_collector_finds_a_stop_string_spanning_pieces() -> None:
    collector = TextCollector(["<|im_end|>"])
    pieces = [b"Answer", b" here<|im", b"_end|> tail"]
    results = [collector.add(p) for p in pieces]
    assert results == [False, False, True]
    assert collector.text == "Answer here"


def test_greedy_sampling_options_make_identical_outputs_once(make_runner) -> None:
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    prompt = runner.joint_tokens(PRELUDE, prompt_for("river"))
    outputs = generate(runner, prelude, prompt, SamplingOptions(temperature=0, max_tokens=4), [None, None],
                              label="p")
    assert outputs[0] == outputs[1]
    assert runner.counters.generated_tokens <= 4


# ----- text of the outputs ---------------------------------------------------------------------


def test_a_partial_last_character_is_kept_as_a_replacement_character() -> None:
    collector = TextCollector([])
    collector.add(b"a" + "\u00e9".encode()[:1])
    assert collector.text == "a"
    assert collector.finish() == "a\ufffd"
    assert collector.text == "a\ufffd"


def test_a_character_split_across_pieces_is_whole_and_finish_adds_nothing() -> None:
    collector = TextCollector([])
    for piece in (b"\xd0", b"\xbc\xd0", b"\xb8\xd1\x80"):
        collector.add(piece)
    assert collector.finish() == "\u043c\u0438\u0440"


def test_a_stop_string_completed_by_the_flushed_tail_still_stops() -> None:
    collector = TextCollector(["x\ufffd"])
    collector.add(b"abx\xd0")
    assert collector.finish() == "ab" and collector.stopped


def test_finish_after_a_stop_adds_nothing() -> None:
    collector = TextCollector(["STOP"])
    assert collector.add(b"abSTOP\xd0")
    assert collector.finish() == "ab"


EMOJI_PRELUDE = "<|im_start|>system\nYou answer with emoji only.<|im_end|>\n<|im_start|>user\n"
EMOJI_PROMPT = "Show three fruit emoji.<|im_end|>\n<|im_start|>assistant\n"


def test_an_output_cut_inside_a_character_ends_in_a_replacement_character(make_runner) -> None:
    """An emoji takes several tokens: cutting the answer after each token count, some cut
    lands inside one, and its bytes must show as U+FFFD, not vanish."""
    runner = make_runner(None)
    prelude = runner.prelude_tokens(EMOJI_PRELUDE, "p")
    full = runner.joint_tokens(EMOJI_PRELUDE, EMOJI_PROMPT)
    texts = [generate(runner, prelude, full, SamplingOptions(temperature=0.0, max_tokens=k), [None],
                      store=False)[0] for k in range(1, 13)]
    cut_inside = [text for text in texts if text.endswith("\ufffd")]
    assert cut_inside, texts
    for text in texts:
        assert texts[-1].startswith(text.rstrip("\ufffd")), texts
