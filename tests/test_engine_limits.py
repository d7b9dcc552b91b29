"""Context parameters llama.cpp would abort on (GGML_ASSERT, exit 134) or crash with get a
one-line error instead: the CLI runs in a subprocess, so an abort would show as its exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PRELUDE, write

BAD_VALUES = [
    *[("--lp-n-batch", str(n)) for n in range(8, 16)],  # aborted in llama_init_from_model before
    ("--lp-n-batch", "16"),  # one short of the 17 sequences (prelude + 16 outputs)
    ("--lp-n-batch", "0"),
    ("--lp-n-batch", str(2**32 + 512)),  # would wrap around in the uint32 field
    ("--lp-n-ubatch", "0"),
    ("--lp-n-ubatch", "600"),  # above n_batch (512): llama.cpp would lower it silently
    ("--lp-n-ctx", "8"),
    ("--lp-n-ctx", "16"),  # fewer cells than sequences
    ("--lp-n-ctx", str(2**32)),
    ("--lp-n-ctx", str(2**30)),  # valid, but no machine has the memory: llama.cpp returns NULL
    ("--n_threads", "0"),
    ("--n_threads", "100000"),  # crashed ggml with a segmentation fault
    ("--lp-n-gpu-layers", "-2"),
]


@pytest.fixture(scope="module")
def one_prelude(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    return root


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_a_value_llama_cpp_rejects_gets_a_one_line_error(one_prelude: Path, flag: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cached_prompts", "--root", str(one_prelude), flag, value, "precache-preludes"],
        capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode in (1, 2), result.stderr[-2000:]
    assert [line for line in lines if not line.startswith("warning:")] == lines[-1:], result.stderr[-2000:]
    assert lines[-1].startswith("error:"), result.stderr[-2000:]
    assert not (one_prelude / "llm_cache").exists() or not any((one_prelude / "llm_cache").glob("*.kv"))


def test_the_smallest_batch_that_fits_the_sequences_works(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    result = subprocess.run(
        [sys.executable, "-m", "cached_prompts", "--root", str(root), "--lp-n-batch", "17",
         "--lp-n-ubatch", "3", "precache-preludes"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((root / "llm_cache").glob("*.kv"))
