"""The command line as a program: ./main.py from a checkout, --version, a reader that closes
stdout early, and the warnings about options that would slow a run down or do nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cached_prompts
from cached_prompts.options import EngineOptions, SamplingOptions

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"


def clean_env() -> dict[str, str]:
    """The environment of a shell where nothing was activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(VENV)))
    return env


def cli_executable() -> list[str]:
    script = VENV / "bin" / "cached-prompts"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cached_prompts"]


# ----- ./main.py from a checkout ---------------------------------------------------------------


@pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="needs `make setup`'s .venv")
def test_main_py_run_by_the_system_python_uses_the_venv(tmp_path: Path) -> None:
    system_python = Path(sys.base_prefix) / "bin" / "python3"
    assert system_python.exists()
    result = subprocess.run([str(system_python), str(REPO / "main.py"), "--version"], cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import llama_cpp

    assert result.stdout.strip() == f"cached-prompts {cached_prompts.__version__} (llama-cpp-python {llama_cpp.__version__})"
    assert result.stderr == ""


# ----- --version and a closed stdout ---------------------------------------------------------


def test_version_names_the_tool_and_llama_cpp_python() -> None:
    import llama_cpp

    result = subprocess.run([*cli_executable(), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cached-prompts {cached_prompts.__version__} (llama-cpp-python {llama_cpp.__version__})"


@pytest.mark.parametrize("args", [["--full-help"], ["--version"], ["--help"]])
def test_a_reader_that_closed_stdout_gets_no_traceback(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the child starts: its first write meets a closed pipe
    try:
        result = subprocess.run([*cli_executable(), *args], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode in (0, 141)


def test_full_help_piped_into_head_prints_its_first_line_and_no_error() -> None:
    command = " ".join(f"'{part}'" for part in cli_executable()) + " --full-help | head -1"
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("usage: cached-prompts")
    assert result.stderr == ""


# ----- option warnings -------------------------------------------------------------------------


def _warnings(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and word in r.getMessage()]


def test_the_tfs_z_warning_is_given_once_per_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    for _ in range(3):  # as a REPL builds the options of each request
        SamplingOptions(tfs_z=0.4321)
    assert len(_warnings(caplog, "tfs_z=0.4321")) == 1
    SamplingOptions(tfs_z=0.4322)
    assert len(_warnings(caplog, "tfs_z")) == 2


def test_more_threads_than_cores_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cores = os.cpu_count() or 1
    EngineOptions(n_threads=cores)
    assert _warnings(caplog, "n_threads") == []
    for _ in range(3):
        EngineOptions(n_threads=cores + 1)
    (warning,) = _warnings(caplog, "n_threads")
    assert f"n_threads={cores + 1}" in warning and f"{cores} cores" in warning


def test_too_many_threads_on_the_command_line_are_warned_about(workspace: Path, cli) -> None:
    threads = (os.cpu_count() or 1) + 2
    code, _, err = cli(workspace, "--n_threads", str(threads), "cache", "size")
    assert code == 0
    assert f"n_threads={threads}" in err and "cores" in err
