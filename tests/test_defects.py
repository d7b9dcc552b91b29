"""Regression tests of defects found while using the tool as a new user would (issue 9).

Each test failed before its fix. Most run real processes and the real model; only a full
disk is injected.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cached_prompts.fs import locks
from cached_prompts.cache.store import META_SUFFIX, STATE_SUFFIX, CacheStore, StateSettings
from cached_prompts.errors import CacheError, CacheWriteError
from cached_prompts.fs.files import TEMP_PREFIX, TEMP_SUFFIX
from cached_prompts.local.generation import TextCollector
from cached_prompts.options import EngineOptions, SamplingOptions
from cached_prompts.workspace.layout import (DRAFTS_OUTPUTS, TEST_PROMPTS_OUTPUTS, Workspace,
                                      remove_stale_output_temp_files)

from .conftest import generate, write

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
SETTINGS = StateSettings("0" * 64, "f16", "test")


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
    assert result.stdout.startswith("cached-prompts ") and "(llama-cpp-python 0.3." in result.stdout
    assert result.stderr == ""


# ----- --version and a closed stdout ---------------------------------------------------------


def test_version_names_the_tool_and_llama_cpp_python() -> None:
    import llama_cpp

    result = subprocess.run([*cli_executable(), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cached-prompts 0.1.0 (llama-cpp-python {llama_cpp.__version__})"


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


# ----- outputs -------------------------------------------------------------------------------


def test_a_folder_where_an_output_should_be_is_never_up_to_date(workspace: Path, cli) -> None:
    blocker = workspace / TEST_PROMPTS_OUTPUTS / "dictionary---river.output-deterministic.txt"
    blocker.mkdir(parents=True)
    code, _, err = cli(workspace, "outputs-test-prompts", "-d", "--max-tokens", "2")
    assert code == 1
    assert f"{blocker} is a folder, not a file" in err and "remove it" in err
    assert blocker.is_dir() and not list(blocker.iterdir())
    assert not re.search(r"[1-9]\d* up to date", err)


def _locked_temp(folder: Path, name: str) -> int:
    fd = os.open(write(folder / f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}", "half"), os.O_RDONLY)
    assert locks.lock_fd(fd)
    return fd


def test_temp_files_of_killed_runs_in_the_output_folders_are_removed(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    dead = [write(tmp_path / folder / f"{TEMP_PREFIX}dead{TEMP_SUFFIX}", "half")
            for folder in (DRAFTS_OUTPUTS, TEST_PROMPTS_OUTPUTS)]
    output = write(tmp_path / TEST_PROMPTS_OUTPUTS / "a---b.output-0.txt", "kept")
    elsewhere = write(tmp_path / "preludes" / f"{TEMP_PREFIX}other{TEMP_SUFFIX}", "not an output folder")
    live_fd = _locked_temp(tmp_path / DRAFTS_OUTPUTS, "live")
    try:
        removed = remove_stale_output_temp_files(workspace)
    finally:
        os.close(live_fd)
    assert sorted(removed) == sorted(dead)
    assert not any(path.exists() for path in dead)
    assert (tmp_path / DRAFTS_OUTPUTS / f"{TEMP_PREFIX}live{TEMP_SUFFIX}").exists()
    assert output.read_text() == "kept" and elsewhere.exists()


def test_removing_output_temp_files_of_a_workspace_without_output_folders_is_a_no_op(tmp_path: Path) -> None:
    assert remove_stale_output_temp_files(Workspace(tmp_path)) == []


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


# ----- the cache: full disk, entries that fail to restore --------------------------------------


def _cache_files(folder: Path) -> list[str]:
    """Entry files and temp files; not the folder's lock file."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != ".lock") if folder.is_dir() else []


def _fail_meta_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if str(dst).endswith(META_SUFFIX):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _fail_every_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("inject", [_fail_every_fsync, _fail_meta_rename])
def test_a_full_disk_while_storing_an_entry_is_a_cache_write_error_that_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject) -> None:
    folder = tmp_path / "cache"
    store = CacheStore(folder, SETTINGS)
    kept = store.store("kept", "prelude", [1, 2], b"k" * 1000)
    inject(monkeypatch)
    with pytest.raises(CacheWriteError) as raised:
        store.store("new", "prelude", [1, 2, 3], b"n" * 5000)
    monkeypatch.undo()
    assert isinstance(raised.value, CacheError)
    message = str(raised.value)
    assert "new" in message and "--cache-max-size" in message and "free" in message
    assert _cache_files(folder) == [f"{kept.name}{STATE_SUFFIX}", f"{kept.name}{META_SUFFIX}"]
    assert [e.label for e in CacheStore(folder, SETTINGS).entries()] == ["kept"]
    assert store.find_exact([1, 2, 3]) is None
    assert store.store("new", "prelude", [1, 2, 3], b"n" * 5000).label == "new"


def test_an_entry_that_failed_to_restore_can_be_discarded_and_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "cache"
    store = CacheStore(folder, SETTINGS)
    store.store("p", "prelude", [5, 6, 7], b"old state")
    entry = store.find_exact([5, 6, 7])
    store.discard_entry(entry, "llama.cpp rejected its state")
    assert store.find_exact([5, 6, 7]) is None and _cache_files(folder) == []
    assert any("llama.cpp rejected its state" in r.getMessage() for r in caplog.records)
    store.store("p", "prelude", [5, 6, 7], b"new state")
    fresh = CacheStore(folder, SETTINGS)
    assert fresh.load_state(fresh.find_exact([5, 6, 7])) == b"new state"


def test_discarding_an_entry_another_process_replaced_meanwhile_keeps_the_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    ours = CacheStore(folder, SETTINGS)
    ours.store("p", "prelude", [5, 6, 7], b"old state")
    stale_entry = ours.find_exact([5, 6, 7])
    other = CacheStore(folder, SETTINGS)
    other.discard_entry(other.find_exact([5, 6, 7]), "test")
    other.store("p", "prelude", [5, 6, 7], b"new state")
    ours.discard_entry(stale_entry, "test")
    assert CacheStore(folder, SETTINGS).load_state(ours.find_exact([5, 6, 7])) == b"new state"

