"""`--lp-repack`: weights stay out of llama.cpp's AMX path, whose matmul crashes on AMX CPUs."""

from __future__ import annotations

from pathlib import Path

from cached_prompts.backend.interface import GenerationRequest, PromptJob
from cached_prompts.local.backend import LocalBackend
from cached_prompts.local.engine import AMX_BUFFER_TYPE, cpu_weight_buffer_types, resolve_repack, state_settings
from cached_prompts.options import EngineOptions, SamplingOptions
from cached_prompts.server.launch import cpu_has_amx, safe_server_flags


def test_auto_follows_this_cpus_real_flags() -> None:
    """On this machine: AMX takes weights only where the CPU has amx_int8, and then `auto` keeps
    them out of it (and llama-server gets --no-repack); elsewhere `auto` keeps repacking."""
    names = cpu_weight_buffer_types()
    has_amx = cpu_has_amx()
    if AMX_BUFFER_TYPE in names:
        assert has_amx, f"llama.cpp lists {names} on a CPU without amx_int8"
    assert resolve_repack("auto") is (AMX_BUFFER_TYPE not in names)
    assert safe_server_flags() == (["--no-repack"] if has_amx else [])
    assert resolve_repack("on") is True and resolve_repack("off") is False


def test_cpuinfo_flags_are_read_per_word(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n", encoding="ascii")
    assert cpu_has_amx(cpuinfo) and safe_server_flags(cpuinfo) == ["--no-repack"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16\n", encoding="ascii")
    assert not cpu_has_amx(cpuinfo) and safe_server_flags(cpuinfo) == []
    assert not cpu_has_amx(tmp_path / "missing")


def test_the_choice_is_part_of_a_states_cache_key() -> None:
    on, off = state_settings(EngineOptions(repack="on"), "0" * 64), state_settings(EngineOptions(repack="off"), "0" * 64)
    assert (on.weights, off.weights) == ("repacked", "plain")
    assert on.key() != off.key()


def test_without_repacking_cached_equals_uncached(tmp_path: Path) -> None:
    """A state computed with plain weights is stored under its own key and gives the uncached
    greedy answer byte for byte."""
    options = EngineOptions(n_ctx=512, repack="off")
    sampling = SamplingOptions(max_tokens=12).as_greedy()
    with LocalBackend(options, None) as uncached:
        prelude = uncached.prelude_tokens("<|im_start|>user\nName a colour.", "prelude")
        full = uncached.joint_tokens("<|im_start|>user\nName a colour.", "<|im_end|>\n<|im_start|>assistant\n")
        expected = uncached.generate(GenerationRequest(prelude, [PromptJob(full, [None])], sampling, "colour"))[0][0].text
    answers = []
    for _ in range(2):  # computes and stores, then restores from the disk
        with LocalBackend(options, tmp_path / "cache") as backend:
            assert backend.settings.weights == "plain"
            answers.append(backend.generate(GenerationRequest(prelude, [PromptJob(full, [None])], sampling, "colour"))[0][0].text)
    assert answers == [expected, expected]
