"""The speed paths on the real engine: several prompts' outputs decoded together,
longest-prefix reuse, the q8_0 KV type and the size of cache entries. No timing here: the
benchmark (bench/bench.py) measures speed; this checks what it must not break."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cached_prompts.backend.interface import GenerationRequest, PromptJob
from cached_prompts.local.generation import generate_branches
from cached_prompts.options import SamplingOptions
from .conftest import CHATML_SYSTEM, GREEDY, PRELUDE, SAMPLED, generate, generate_many, missing_tool, prompt_for
from .server_fixtures import llama_server_binary

ROOT = Path(__file__).resolve().parents[1]
RAW_F16_KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 2  # SmolLM2-135M: layers x KV heads x head dim x K,V x f16
WORDS = ["river", "library", "umbrella"]
SEEDS = [11, 22, 33]


def long_prelude(examples: int) -> str:
    pairs = [("apple", "A round fruit with crisp white flesh."), ("bicycle", "A vehicle with two wheels."),
             ("candle", "A stick of wax with a wick that gives light."), ("harbor", "A sheltered place for ships."),
             ("mirror", "A glass surface that reflects images."), ("orchard", "A field of fruit trees.")]
    turns = [f"{word} number {i}<|im_end|>\n<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>user\n"
             for i in range(examples) for word, text in [pairs[i % len(pairs)]]]
    return CHATML_SYSTEM + "".join(turns)


def test_each_prompt_of_a_batch_gets_its_own_outputs(make_runner) -> None:
    """Outputs are mapped back to their prompt: several prompts' greedy outputs in one
    request are each the greedy output of that prompt alone (greedy outputs are decoded alone,
    so any mix-up of jobs shows)."""
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    fulls = [runner.joint_tokens(PRELUDE, prompt_for(word)) for word in WORDS]
    greedy = GREEDY.model_copy(update={"max_tokens": 4})
    alone = [generate(runner, prelude, full, greedy, [None])[0] for full in fulls]
    assert len(set(alone)) == len(WORDS), "the prompts should get different answers"
    assert [texts[0] for texts in generate_many(runner, prelude, fulls, greedy, [[None]] * 3)] == alone
    mixed = generate_many(runner, prelude, fulls, greedy, [[SEEDS[0], None], [None], [None, SEEDS[1]]])
    assert [mixed[0][1], mixed[1][0], mixed[2][0]] == alone


def test_greedy_output_is_the_same_alone_batched_and_uncached(make_runner, tmp_path: Path) -> None:
    """Greedy outputs are decoded alone, so batching other prompts' outputs never changes them."""
    fresh = make_runner(None)
    prelude = fresh.prelude_tokens(PRELUDE, "p")
    prompts = [fresh.joint_tokens(PRELUDE, prompt_for(word)) for word in WORDS]
    expected = [generate(fresh, prelude, prompt, GREEDY, [None], label="p")[0] for prompt in prompts]
    for cache_dir in (None, tmp_path / "cache", tmp_path / "cache"):
        runner = make_runner(cache_dir)
        batched = generate_many(runner, prelude, prompts, SAMPLED, [[*SEEDS, None]] * len(prompts), label="p")
        assert [outputs[-1] for outputs in batched] == expected
    assert runner.counters.sources == ["cache"]


def test_sampled_outputs_of_several_prompts_are_reproducible(make_runner) -> None:
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    prompts = [runner.joint_tokens(PRELUDE, prompt_for(word)) for word in WORDS]
    seeds = [SEEDS] * len(prompts)
    first = generate_many(runner, prelude, prompts, SAMPLED, seeds, label="p")
    again = generate_many(make_runner(None), prelude, prompts, SAMPLED, seeds, label="p")
    assert first == again
    assert [len(outputs) for outputs in first] == [len(SEEDS)] * len(prompts)
    assert all(text for outputs in first for text in outputs)
    assert runner.counters.generated_tokens > 0


def test_waves_respect_the_sequences_and_the_free_cells(make_runner, monkeypatch) -> None:
    runner = make_runner(None)  # 8 sequences, 1,024 cells
    prelude = runner.prelude_tokens(PRELUDE, "p")
    prompts = [runner.joint_tokens(PRELUDE, prompt_for(word)) for word in WORDS]
    seeds = [[1, 2, 3, 4, 5, 5]] * 3  # a repeated seed is generated once
    request = GenerationRequest(prelude, [PromptJob(full, s) for full, s in zip(prompts, seeds)], SAMPLED, "p")
    waves = runner.plan_waves(request, [100] * 3)
    sizes = [sum(len(chunk) for _, chunk in wave) for wave in waves]
    assert max(sizes) <= 8 and sum(sizes) == 15
    for wave in waves:
        cells = len(prelude) - 1 + sum(len(prompts[i]) - (len(prelude) - 1) + len(chunk) * 100 for i, chunk in wave)
        assert cells <= runner.n_ctx
    assert [(i, s) for wave in waves for i, chunk in wave for s in chunk] == \
        [(i, s) for i in range(3) for s in [1, 2, 3, 4, 5]]

    seen: list[int] = []
    original = generate_branches

    def spy(context, model, branches, *args, **kwargs):
        seen.append(sum(len(b.seeds) for b in branches))
        return original(context, model, branches, *args, **kwargs)

    monkeypatch.setattr("cached_prompts.local.backend.generate_branches", spy)
    outputs = generate_many(runner, prelude, prompts, SAMPLED.model_copy(update={"max_tokens": 3}), seeds,
                                   label="p")
    assert max(seen) <= runner.n_parallel and sum(seen) == 15
    assert [len(texts) for texts in outputs] == [6, 6, 6]
    assert all(texts[4] == texts[5] for texts in outputs)  # seed 5 twice: one output, given twice


def test_stop_strings_end_each_batched_output(make_runner) -> None:
    runner = make_runner(None)
    prelude = runner.prelude_tokens(PRELUDE, "p")
    prompts = [runner.joint_tokens(PRELUDE, prompt_for(word)) for word in WORDS]
    sampling = SamplingOptions(max_tokens=24, stop=[" "])
    outputs = generate_many(runner, prelude, prompts, sampling, [SEEDS] * 3, label="p")
    assert all(" " not in text for texts in outputs for text in texts)


def test_longest_prefix_reuse_evaluates_only_the_rest(make_runner, tmp_path: Path) -> None:
    short_text, long_text = long_prelude(4), long_prelude(9)
    cached = make_runner(tmp_path / "cache")
    short, long = cached.prelude_tokens(short_text, "s"), cached.prelude_tokens(long_text, "l")
    assert long[:len(short)] == short
    assert cached.prepare_prelude(short, "short").source == "computed"
    load = cached.prepare_prelude(long, "long")
    assert (load.source, load.reused_tokens, load.computed_tokens) == \
        ("prefix", len(short) - 1, len(long) - len(short))
    prompt = cached.joint_tokens(long_text, prompt_for("river"))
    from_prefix = generate(cached, long, prompt, GREEDY, [None], label="long")
    from_scratch = generate(make_runner(None), long, prompt, GREEDY, [None], label="long")
    assert from_prefix == from_scratch


def test_longest_prefix_reuse_of_a_prelude_that_diverges(make_runner, tmp_path: Path) -> None:
    """A prelude that shares only the first part of a cached one: the entry is trimmed."""
    cached = make_runner(tmp_path / "cache")
    base = cached.prelude_tokens(long_prelude(6), "b")
    cached.prepare_prelude(base, "base")
    other_text = long_prelude(3) + "kettle<|im_end|>\n<|im_start|>assistant\nA pot for boiling water.<|im_end|>\n"
    other = cached.prelude_tokens(other_text, "o")
    shared = next(i for i, (a, b) in enumerate(zip(base, other)) if a != b)
    load = cached.prepare_prelude(other, "other")
    assert (load.source, load.reused_tokens, load.computed_tokens) == \
        ("prefix", shared, len(other) - 1 - shared)
    prompt = cached.joint_tokens(other_text, prompt_for("river"))
    assert generate(cached, other, prompt, GREEDY, [None], label="other") == \
        generate(make_runner(None), other, prompt, GREEDY, [None], label="other")


def entry_bytes_per_token(runner, tokens: list[int]) -> float:
    entry = runner.cache.find_exact(tokens)
    assert entry is not None
    return entry.state_bytes / (len(tokens) - 1)


def test_f16_cache_entries_are_the_raw_kv_size(make_runner, tmp_path: Path) -> None:
    runner = make_runner(tmp_path / "cache")
    tokens = runner.prelude_tokens(long_prelude(12), "p")
    assert 200 < len(tokens) < 600
    runner.prepare_prelude(tokens, "p")
    per_token = entry_bytes_per_token(runner, tokens)
    assert RAW_F16_KV_BYTES_PER_TOKEN <= per_token <= 1.05 * RAW_F16_KV_BYTES_PER_TOKEN


# q8_0 stores K and V in 8.5 bits (34 bytes per 32 values): 0.53x of f16's 16 bits;
# q8_0-keys only K: (8.5 + 16) / 32 = 0.77x.
@pytest.mark.parametrize("kv_type, smallest, largest", [("q8_0", 0.50, 0.55), ("q8_0-keys", 0.74, 0.79)])
def test_quantized_kv_works_end_to_end_with_smaller_entries(make_runner, tmp_path: Path, kv_type: str,
                                                            smallest: float, largest: float) -> None:
    cache_dir = tmp_path / "cache"
    runner = make_runner(cache_dir, kv_type=kv_type)
    tokens = runner.prelude_tokens(long_prelude(12), "p")
    prompts = [runner.joint_tokens(long_prelude(12), prompt_for(word)) for word in WORDS]
    first = generate_many(runner, tokens, prompts, SAMPLED, [[None, *SEEDS]] * 3, label="p")
    assert all(text for texts in first for text in texts)
    per_token = entry_bytes_per_token(runner, tokens)
    assert smallest * RAW_F16_KV_BYTES_PER_TOKEN <= per_token <= largest * RAW_F16_KV_BYTES_PER_TOKEN
    restored = make_runner(cache_dir, kv_type=kv_type)
    assert generate_many(restored, tokens, prompts, SAMPLED, [[None, *SEEDS]] * 3, label="p") == first
    assert restored.counters.sources == ["cache"]
    f16 = make_runner(cache_dir)  # the KV type is part of the key: no quantized state is reused
    assert f16.prepare_prelude(tokens, "p").source == "computed"


def test_bench_quick_runs_and_writes_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--output", str(output)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text("utf-8"))
    for key in ("ttft_f16", "ttft_q8_0", "cache_f16", "cache_q8_0", "llama_cpp_python_save_state",
                "workload_llama_cpp_python", "workload_ours_f16", "workload_ours_q8_0"):
        assert key in results
    assert results["workload_ours_f16"]["prompts_together"]["tokens"] > 0
    assert "decode" in results["workload_ours_f16"] and "time_breakdown" in results["workload_ours_f16"]
    assert "ratio" in done.stdout


def test_repl_bench_quick_runs_every_side_and_the_ceiling(tmp_path: Path) -> None:
    if llama_server_binary() is None:
        missing_tool("llama-server is not built (make llama-server)")
    output = tmp_path / "repl.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_repl.py"), "--quick", "--kv-type", "q8_0-keys",
                           "--threads", "1", "--output", str(output)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(output.read_text("utf-8"))
    assert results["kv_type"] == "q8_0-keys"
    for config in ("server_default", "server_unified"):
        for way in ("together", "one_after_another"):
            assert results[f"{config}_{way}_tok_s"] > 0
    for ours in ("ours_prompts_request", "ours_lines_batch_waiting", "ours_one_prompt_per_request",
                 "ceiling_llama_decode"):
        assert results[f"{ours}_tok_s"] > 0 and results[f"ratio_{ours}"] > 0
    assert "llama-server's best" in done.stdout
