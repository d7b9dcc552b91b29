"""A cache you can trust: integrity checks, kills at any moment, two processes at once,
other models and KV types, the size limit, and clear errors that lose nothing.

Real engine, real tiny model; only a full disk is injected (a real one cannot be reached).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from .conftest import CHATML_SYSTEM, PRELUDE, age, generate, prompt_for, write

from cached_prompts.backend.interface import PreludeKind
from cached_prompts.fs import locks
from cached_prompts.cache.store import (FOLDER_LOCK, META_SUFFIX, STATE_SUFFIX, CacheStore, StateSettings,
                                  clear_folder, entry_lock_path, folder_size, parse_meta, tokens_digest)
from cached_prompts.fs.files import TEMP_PREFIX, TEMP_SUFFIX

MAX_TOKENS = ("--max-tokens", "8")
# One thread per process: the tests start several processes on a few shared cores, where
# llama.cpp's threads would mostly wait on each other.
ONE_THREAD = ("--n_threads", "1")
WORDS = ["river", "mountain", "bicycle", "library", "umbrella", "garden", "candle", "window"]
STORY = CHATML_SYSTEM + "".join(
    f"{w}<|im_end|>\n<|im_start|>assistant\nA {w} is a thing people know well, item {i}.<|im_end|>\n"
    "<|im_start|>user\n" for i, w in enumerate(WORDS))
STORY_MORE = (STORY + "forest<|im_end|>\n<|im_start|>assistant\nMany trees together.<|im_end|>\n"
              "<|im_start|>user\n")


def build_workspace(root: Path) -> Path:
    """The conftest workspace plus two longer preludes (one extends the other)."""
    write(root / "preludes" / "dictionary.txt", PRELUDE)
    write(root / "preludes" / "dictionary-long.txt",
          PRELUDE + "bicycle<|im_end|>\n<|im_start|>assistant\nA vehicle with two wheels.<|im_end|>\n"
          "<|im_start|>user\n")
    write(root / "preludes" / "story.txt", STORY)
    write(root / "preludes" / "story-more.txt", STORY_MORE)
    write(root / "test_prompts" / "dictionary---river.txt", prompt_for("river"))
    write(root / "test_prompts" / "dictionary---library.txt", prompt_for("library"))
    write(root / "test_prompts" / "dictionary-long---umbrella.txt", prompt_for("umbrella"))
    write(root / "test_prompts" / "story---Большие данные.txt", prompt_for("kettle"))
    write(root / "test_prompts" / "story-more---pencil.txt", prompt_for("pencil"))
    return root


def cli_command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cached_prompts", "--root", str(root), "--lp-n-ctx", "1024",
            "--lp-n-batch", "256", *ONE_THREAD, *args]


def run_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(root, *args), capture_output=True, text=True, timeout=300)


def outputs(root: Path) -> dict[str, bytes]:
    folder = root / "test_prompts_outputs"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.txt"))}  # not the run records


def entry_names(cache: Path) -> list[str]:
    return sorted(p.name[: -len(META_SUFFIX)] for p in cache.glob(f"*{META_SUFFIX}"))


def entry_of(cache: Path, label: str) -> str:
    (name,) = [n for n in entry_names(cache) if n.rsplit(".", 1)[0] == label]
    return name


def assert_every_entry_verifies(cache: Path) -> None:
    """What a reader could use: every entry whose metadata exists is complete and intact."""
    for name in entry_names(cache):
        entry = parse_meta(cache / f"{name}{META_SUFFIX}")
        data = (cache / f"{name}{STATE_SUFFIX}").read_bytes()
        assert len(data) == entry.state_bytes, name
        assert hashlib.sha256(data).hexdigest() == entry.state_sha256, name


def leftovers(cache: Path) -> list[str]:
    temps = [p.name for p in cache.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}")]
    states = {p.name[: -len(STATE_SUFFIX)] for p in cache.glob(f"*{STATE_SUFFIX}")}
    return sorted(temps + [f"{n}{STATE_SUFFIX}" for n in states - set(entry_names(cache))])


CLI_FLAGS = ONE_THREAD  # conftest's `cli` and `make_runner` read these
RUNNER_OPTIONS = {"n_threads": 1}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The deterministic outputs of a clean run without any cache."""
    root = build_workspace(tmp_path_factory.mktemp("clean") / "ws")
    result = run_cli(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS)
    assert result.returncode == 0, result.stderr
    found = outputs(root)
    assert len(found) == 5 and all(found.values())
    return found


# ----- crash safety --------------------------------------------------------------------------


def test_killing_precache_at_many_points_never_leaves_an_entry_that_is_used(
        tmp_path: Path, reference: dict[str, bytes]) -> None:
    root = build_workspace(tmp_path / "ws")
    cache = root / "llm_cache"
    started = time.monotonic()
    assert run_cli(root, "precache-preludes").returncode == 0
    clean_seconds = time.monotonic() - started
    rng = random.Random(5)
    stderr_texts = []
    for i in range(8):
        if i % 2 == 0:
            # start over; odd rounds resume from the killed round's leftovers
            shutil.rmtree(cache, ignore_errors=True)
        with open(tmp_path / f"stderr-{i}", "w+") as err:
            child = subprocess.Popen(cli_command(root, "precache-preludes"), stdout=subprocess.DEVNULL,
                                     stderr=err)
            try:
                child.wait(timeout=clean_seconds * (i + rng.random()) / 8)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            err.seek(0)
            stderr_texts.append(err.read())
        assert_every_entry_verifies(cache)
    final = run_cli(root, "precache-preludes")
    assert final.returncode == 0, final.stderr
    assert leftovers(cache) == []
    assert_every_entry_verifies(cache)
    result = run_cli(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS)
    assert result.returncode == 0, result.stderr
    assert outputs(root) == reference
    assert not [text for text in [*stderr_texts, final.stderr, result.stderr] if "is invalid" in text]


WRITER = """
import sys
from pathlib import Path
from cached_prompts.backend.interface import PreludeKind
from cached_prompts.cache.store import CacheStore, StateSettings
store = CacheStore(Path(sys.argv[1]), StateSettings("0" * 64, "f16", "test"))
print("ready", flush=True)
for i in range(4):
    store.store(f"big{i}", PreludeKind.PRELUDE, [1, 2, 3, i], bytes([i]) * (48 << 20))
"""


def test_killing_a_writer_mid_write_leaves_nothing_that_is_used(tmp_path: Path) -> None:
    """Kills that land inside the writes themselves (a real precache mostly computes)."""
    cache = tmp_path / "cache"
    settings = StateSettings("0" * 64, "f16", "test")
    clean = subprocess.Popen([sys.executable, "-c", WRITER, str(cache)], stdout=subprocess.PIPE, text=True)
    assert clean.stdout.readline().strip() == "ready"
    started = time.monotonic()
    assert clean.wait(timeout=300) == 0
    write_seconds = time.monotonic() - started
    rng = random.Random(7)
    for i in range(6):
        shutil.rmtree(cache, ignore_errors=True)
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(cache)], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(write_seconds * (i + rng.random()) / 6)
        child.kill()
        child.wait()
        assert_every_entry_verifies(cache)
        store = CacheStore(cache, settings)
        for entry in store.entries():
            assert store.load_state(entry) is not None
        assert leftovers(cache) == []


def test_leftovers_of_killed_writers_are_removed_but_live_writes_are_left_alone(
        tmp_path: Path, make_runner, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    runner = make_runner(cache)
    runner.prepare_prelude(runner.prelude_tokens(PRELUDE, "p"), "dictionary")
    (name,) = entry_names(cache)
    kv = (cache / f"{name}{STATE_SUFFIX}").read_bytes()
    dead_temp = write(cache / f"{TEMP_PREFIX}dead{TEMP_SUFFIX}", "half")
    live_temp = write(cache / f"{TEMP_PREFIX}live{TEMP_SUFFIX}", "half")
    orphan = cache / f"orphan.{'0' * 20}{STATE_SUFFIX}"
    orphan.write_bytes(kv)
    busy_digest = "1" * 20
    busy = cache / f"busy.{busy_digest}{STATE_SUFFIX}"
    busy.write_bytes(kv)
    no_state = cache / f"gone.{'2' * 20}{META_SUFFIX}"
    shutil.copy(cache / f"{name}{META_SUFFIX}", no_state)
    live_fd = os.open(live_temp, os.O_RDONLY)
    try:
        assert locks.lock_fd(live_fd)
        with locks.held(entry_lock_path(cache, busy_digest)):
            CacheStore(cache, runner.settings).entries()
    finally:
        os.close(live_fd)
    assert not dead_temp.exists() and not orphan.exists() and not no_state.exists()
    assert live_temp.exists() and busy.exists()
    assert (cache / f"{name}{STATE_SUFFIX}").exists()
    warnings = [r.getMessage() for r in caplog.records if "is invalid" in r.getMessage()]
    assert len(warnings) == 1 and "gone." in warnings[0] and "state file is missing" in warnings[0]


def test_a_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "entry.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from cached_prompts.fs import "
         "locks; locks.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.acquire(path, blocking=False) is None
    finally:
        holder.kill()
        holder.wait()
    fd = locks.acquire(path, blocking=False)
    assert fd is not None
    locks.release(fd, path)


# ----- integrity -----------------------------------------------------------------------------


def _precached(tmp_path: Path) -> tuple[Path, Path]:
    root = build_workspace(tmp_path / "ws")
    assert run_cli(root, "precache-preludes").returncode == 0
    return root, root / "llm_cache"


def _run_outputs_expecting_one_warning(cli, root: Path, reason: str, reference: dict[str, bytes]) -> None:
    code, _, err = cli(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "is invalid" in line]
    assert len(warnings) == 1 and reason in warnings[0], err
    assert outputs(root) == reference
    assert_every_entry_verifies(root / "llm_cache")
    assert len(entry_names(root / "llm_cache")) == 4


def test_flipped_bytes_in_a_state_file_are_detected_and_recomputed(tmp_path, cli, reference) -> None:
    root, cache = _precached(tmp_path)
    path = cache / f"{entry_of(cache, 'story')}{STATE_SUFFIX}"
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 16):
        data[offset] ^= 0x5A
    path.write_bytes(data)
    _run_outputs_expecting_one_warning(cli, root, "checksum mismatch", reference)


def test_a_truncated_state_file_is_detected_and_recomputed(tmp_path, cli, reference) -> None:
    root, cache = _precached(tmp_path)
    path = cache / f"{entry_of(cache, 'dictionary-long')}{STATE_SUFFIX}"
    os.truncate(path, path.stat().st_size - 1000)
    _run_outputs_expecting_one_warning(cli, root, "metadata says", reference)


def test_metadata_whose_tokens_do_not_match_its_name_is_never_used(tmp_path, cli, reference) -> None:
    root, cache = _precached(tmp_path)
    path = cache / f"{entry_of(cache, 'story')}{META_SUFFIX}"
    meta = json.loads(path.read_text())
    meta["tokens"] = meta["tokens"][:40]  # a prefix of the others: would be reused if trusted
    path.write_text(json.dumps(meta))
    _run_outputs_expecting_one_warning(cli, root, "do not match its file name", reference)


def test_an_entry_of_another_format_version_is_removed(tmp_path, cli, reference) -> None:
    root, cache = _precached(tmp_path)
    path = cache / f"{entry_of(cache, 'dictionary')}{META_SUFFIX}"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format": 99}))
    _run_outputs_expecting_one_warning(cli, root, "format 99", reference)


def test_an_entry_of_an_unknown_kind_is_removed(tmp_path, cli, reference) -> None:
    root, cache = _precached(tmp_path)
    path = cache / f"{entry_of(cache, 'story')}{META_SUFFIX}"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"kind": "notes"}))
    _run_outputs_expecting_one_warning(cli, root, "its kind 'notes' is none of", reference)


def _other_model(model_path: Path, target: Path) -> Path:
    """A copy of the model with another `general.name`: loads the same, hashes differently."""
    data = bytearray(model_path.read_bytes())
    at = data.index(b"general.name") + len("general.name") + 12
    data[at] = ord("T") if data[at] != ord("T") else ord("U")
    target.write_bytes(data)
    return target


def test_a_cache_of_one_model_is_not_used_with_another(tmp_path: Path, make_runner, model_path: Path) -> None:
    cache = tmp_path / "cache"
    first = make_runner(cache)
    tokens = first.prelude_tokens(PRELUDE, "p")
    assert first.prepare_prelude(tokens, "dictionary").source == "computed"
    other = make_runner(cache, model_path=str(_other_model(model_path, tmp_path / "other.gguf")))
    assert other.prelude_tokens(PRELUDE, "p") == tokens
    assert other.prepare_prelude(tokens, "dictionary").source == "computed"
    entries = CacheStore(cache, first.settings).entries(all_settings=True)
    assert len({e.settings["model_sha256"] for e in entries}) == 2 and len(entries) == 2
    assert make_runner(cache).prepare_prelude(tokens, "dictionary").source == "cache"


def test_a_cache_of_one_kv_type_is_not_used_with_another(tmp_path: Path, make_runner) -> None:
    from .conftest import GREEDY

    cache = tmp_path / "cache"
    f16 = make_runner(cache)
    tokens = f16.prelude_tokens(PRELUDE, "p")
    prompt = f16.joint_tokens(PRELUDE, prompt_for("river"))
    generate(f16, tokens, prompt, GREEDY, [None], label="dictionary")
    q8 = make_runner(cache, kv_type="q8_0")
    uncached = generate(q8, tokens, prompt, GREEDY, [None], label="dictionary")
    assert q8.counters.sources == ["computed"]
    entries = CacheStore(cache, q8.settings).entries(all_settings=True)
    assert sorted(e.settings["kv_type"] for e in entries) == ["f16", "q8_0"]
    q8_again = make_runner(cache, kv_type="q8_0")
    assert generate(q8_again, tokens, prompt, GREEDY, [None], label="dictionary") == uncached
    assert q8_again.counters.sources == ["cache"] and uncached[0]


# ----- concurrency ---------------------------------------------------------------------------


def _run_two_at_once(root: Path, *args: str) -> list[tuple[int, str]]:
    children = [subprocess.Popen(cli_command(root, *args), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    return [(child.wait(timeout=300), child.stderr.read()) for child in children]


def test_two_concurrent_output_runs_both_finish_with_complete_outputs(tmp_path, reference) -> None:
    root = build_workspace(tmp_path / "ws")
    results = _run_two_at_once(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS)
    assert [code for code, _ in results] == [0, 0], results
    assert outputs(root) == reference
    for text in reference.values():
        text.decode("utf-8")
    assert not [err for _, err in results if "is invalid" in err]
    cache = root / "llm_cache"
    assert leftovers(cache) == [] and len(entry_names(cache)) == 4
    assert_every_entry_verifies(cache)


def test_two_concurrent_precaches_compute_each_prelude_once(tmp_path: Path) -> None:
    root = build_workspace(tmp_path / "ws")
    results = _run_two_at_once(root, "precache-preludes")
    assert [code for code, _ in results] == [0, 0], results
    computed = [int(re.search(r"preludes: (\d+) computed", err).group(1)) for _, err in results]
    assert sum(computed) == 4, results
    assert len(entry_names(root / "llm_cache")) == 4


# ----- size limit ----------------------------------------------------------------------------


def _limit_for_two_largest(tmp_path: Path) -> int:
    root, cache = _precached(tmp_path / "measure")
    sizes = sorted((cache / f"{n}{STATE_SUFFIX}").stat().st_size for n in entry_names(cache))
    return sizes[-1] + sizes[-2] + 64 * 1024


@pytest.mark.parametrize("how", ["flag", "config"])
def test_the_size_limit_holds_after_caching_more_than_fits(tmp_path: Path, cli, how: str) -> None:
    limit = _limit_for_two_largest(tmp_path)
    root = build_workspace(tmp_path / "ws")
    if how == "flag":
        code, _, err = cli(root, "--cache-max-size", str(limit), "precache-preludes")
    else:
        write(root / "cached-prompts.toml", f'cache_max_size = "{limit // 1024}K"\n')
        code, _, err = cli(root, "precache-preludes")
    assert code == 0, err
    cache = root / "llm_cache"
    assert folder_size(cache) <= limit
    names = entry_names(cache)
    assert 1 <= len(names) < 4 and any(n.startswith("story-more.") for n in names)
    assert "evicted" in err
    assert_every_entry_verifies(cache)


def test_eviction_removes_the_least_recently_used_and_use_refreshes(tmp_path: Path, make_runner) -> None:
    cache = tmp_path / "cache"
    runner = make_runner(cache, cache_max_size="1T")
    texts = {"a": PRELUDE, "b": STORY,  # "c" shares no reusable prefix and is smaller than "a"
             "c": "<|im_start|>system\nTranslate.<|im_end|>\n<|im_start|>user\ncat<|im_end|>\n"
                  "<|im_start|>assistant\nchat<|im_end|>\n<|im_start|>user\n"}
    tokens = {label: runner.prelude_tokens(text, label) for label, text in texts.items()}
    for label in ("a", "b"):
        runner.prepare_prelude(tokens[label], label)
    age(cache / f"{entry_of(cache, 'a')}{META_SUFFIX}", 50)
    age(cache / f"{entry_of(cache, 'b')}{META_SUFFIX}", 100)
    before = (cache / f"{entry_of(cache, 'b')}{META_SUFFIX}").stat().st_mtime
    reader = make_runner(cache)
    assert reader.prepare_prelude(tokens["b"], "b").source == "cache"
    assert (cache / f"{entry_of(cache, 'b')}{META_SUFFIX}").stat().st_mtime > before  # used: refreshed
    limit = folder_size(cache) + 1024  # room for "c" only if "a" goes
    small = make_runner(cache, cache_max_size=str(limit))
    small.prepare_prelude(tokens["c"], "c")
    assert [n.rsplit(".", 1)[0] for n in entry_names(cache)] == ["b", "c"]
    assert folder_size(cache) <= limit


# ----- clear errors, nothing lost --------------------------------------------------------------


IN_PROCESS = ("--lp-engine-process", "in-process")  # the monkeypatched functions run in this process


def _no_space(monkeypatch: pytest.MonkeyPatch, only_in: Path | None = None) -> None:
    """A full disk: every write fails, or only those of files placed in `only_in`."""
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        if only_in is not None:
            return real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    def replace(src, dst, **kwargs):
        if only_in is not None and Path(dst).parent == only_in:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)


def test_a_cache_without_room_is_warned_about_and_the_outputs_are_still_made(
        tmp_path, cli, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_workspace(tmp_path / "ws")
    cache = root / "llm_cache"
    _no_space(monkeypatch, only_in=cache)
    code, _, err = cli(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS, *IN_PROCESS)
    monkeypatch.undo()
    assert code == 0 and error_lines(err) == [], err
    assert outputs(root) == reference
    warnings = [line for line in err.splitlines() if "no space left on the disk" in line]
    assert warnings and all(line.startswith("warning:") and "--cache-max-size" in line for line in warnings)
    assert entry_names(cache) == [] and leftovers(cache) == []


def test_a_full_disk_stops_only_what_cannot_be_written_and_loses_nothing(
        tmp_path, cli, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    root = build_workspace(tmp_path / "ws")
    assert cli(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS)[0] == 0
    before_outputs, before_cache = outputs(root), entry_names(root / "llm_cache")
    write(root / "preludes" / "new.txt", PRELUDE + "new<|im_end|>\n")
    _no_space(monkeypatch)
    code, _, err = cli(root, "precache-preludes", *IN_PROCESS)
    assert code == 0 and error_lines(err) == [], err  # a state not stored is recomputed when needed
    assert "no space left on the disk while writing" in err and "free some space" in err
    code, _, err = cli(root, "outputs-test-prompts", "--deterministic", "--force-outputs", *MAX_TOKENS, *IN_PROCESS)
    assert code == 1 and len(error_lines(err)) == 1 and "test_prompts_outputs" in err, err
    monkeypatch.undo()
    assert outputs(root) == before_outputs == reference
    assert entry_names(root / "llm_cache") == before_cache
    assert leftovers(root / "llm_cache") == []
    assert not list((root / "test_prompts_outputs").glob(f"{TEMP_PREFIX}*"))


def test_a_missing_workspace_folder_is_one_clear_error(tmp_path: Path, cli) -> None:
    code, out, err = cli(tmp_path / "nowhere", "precache-preludes")
    assert code == 1 and out == ""
    assert error_lines(err) == [f"error: workspace folder {tmp_path / 'nowhere'} does not exist; "
                                "create it or pass --root with an existing folder"]


def test_a_non_utf8_input_is_skipped_and_the_others_are_done(tmp_path, cli, reference) -> None:
    root = build_workspace(tmp_path / "ws")
    (root / "test_prompts" / "dictionary---bad.txt").write_bytes(b"caf\xe9\n")
    code, _, err = cli(root, "outputs-test-prompts", "--deterministic", *MAX_TOKENS)
    assert code == 1
    assert len(error_lines(err)) == 1 and "not UTF-8" in err and "save it as UTF-8" in err
    assert outputs(root) == reference


def test_an_empty_prelude_is_skipped_and_the_others_are_cached(tmp_path: Path, cli) -> None:
    root = build_workspace(tmp_path / "ws")
    write(root / "preludes" / "empty.txt", "")
    code, _, err = cli(root, "precache-preludes")
    assert code == 1 and len(error_lines(err)) == 1 and "empty.txt is empty" in err, err
    assert len(entry_names(root / "llm_cache")) == 4


def test_a_model_that_is_not_gguf_is_one_clear_error_and_the_cache_stays(tmp_path: Path, cli) -> None:
    root, cache = _precached(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    fake = write(tmp_path / "model.bin", "not a model")
    code, _, err = cli(root, "--lp-model-path", str(fake), "outputs-test-prompts", "-d")
    assert code == 1 and len(error_lines(err)) == 1 and "is not a GGUF file" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert outputs(root) == {}


def test_a_context_too_small_for_a_prelude_skips_only_that_prelude(tmp_path: Path, cli) -> None:
    root = build_workspace(tmp_path / "ws")
    code, _, err = cli(root, "--lp-n-ctx", "160", "precache-preludes")
    assert code == 1, err
    assert len(error_lines(err)) == 2 and all("raise --lp-n-ctx" in line for line in error_lines(err))
    labels = sorted(n.rsplit(".", 1)[0] for n in entry_names(root / "llm_cache"))
    assert labels == ["dictionary", "dictionary-long"]


# ----- files planted in the cache folder -----------------------------------------------------

FAKE_SETTINGS = StateSettings("0" * 64, "f16", "test")
# A reader that would take the whole of /dev/zero or a huge file fails fast under this limit.
MEMORY_LIMIT = 1 << 30
READER = """
import sys
from pathlib import Path
from cached_prompts.commands import cache_admin
from cached_prompts.cache.store import CacheStore, StateSettings
folder, action = Path(sys.argv[1]), sys.argv[2]
store = CacheStore(folder, StateSettings("0" * 64, "f16", "test"))
if action == "list":
    print(cache_admin.render_list(folder, cache_admin.list_entries(folder, None), False))
    print(cache_admin.render_size(cache_admin.size_report(folder, 1 << 30), False))
elif action == "entries":
    print(len(store.entries()))
else:
    print(store.load_state(store.find_exact([1, 2, 3])))
"""


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_reader(folder: Path, action: str) -> subprocess.CompletedProcess[str]:
    """Read the cache in a child with bounded memory; a hang fails the test at the timeout."""
    return subprocess.run([sys.executable, "-c", READER, str(folder), action], capture_output=True,
                          text=True, timeout=60, preexec_fn=_limit_memory)


def plant(path: Path, kind: str, tmp_path: Path) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "huge sparse file":
        with open(path, "wb") as handle:
            handle.truncate(8 << 30)
    elif kind == "link to a copy":
        outside = tmp_path / "outside-copy"
        outside.write_bytes(b"{}")
        path.symlink_to(outside)
    else:
        raise ValueError(kind)


def test_lock_files_planted_as_links_create_nothing_outside(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    cache, outside = tmp_path / "ws" / "llm_cache", tmp_path / "outside"
    outside.mkdir()
    tokens = [1, 2, 3]
    entry_lock = entry_lock_path(cache, tokens_digest(FAKE_SETTINGS.key(), tokens))
    entry_lock.parent.mkdir(parents=True)
    entry_lock.symlink_to(outside / "entry.lock")
    (cache / FOLDER_LOCK).symlink_to(outside / "folder.lock")
    store = CacheStore(cache, FAKE_SETTINGS)
    entry = store.store("p", PreludeKind.PRELUDE, tokens, b"s" * 100)  # takes both locks
    assert list(outside.iterdir()) == []
    assert not (cache / FOLDER_LOCK).is_symlink() and not entry_lock.is_symlink()
    assert CacheStore(cache, FAKE_SETTINGS).load_state(entry) == b"s" * 100
    assert any("not a regular file" in r.getMessage() for r in caplog.records)
    (cache / FOLDER_LOCK).unlink()
    (cache / FOLDER_LOCK).symlink_to(outside / "folder.lock")
    assert [e.label for e in clear_folder(cache)] == ["p"]
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "huge sparse file", "link to a copy"])
def test_planted_metadata_neither_hangs_nor_floods_memory_and_only_use_removes_it(
        tmp_path: Path, kind: str) -> None:
    cache = tmp_path / "cache"
    CacheStore(cache, FAKE_SETTINGS).store("good", PreludeKind.PRELUDE, [1, 2], b"s" * 100)
    planted = cache / f"planted.{'a' * 20}{META_SUFFIX}"
    plant(planted, kind, tmp_path)
    (cache / f"planted.{'a' * 20}{STATE_SUFFIX}").write_bytes(b"s" * 100)  # not a mere leftover
    listed = run_reader(cache, "list")
    assert listed.returncode == 0, listed.stderr
    assert "good" in listed.stdout and "planted" in listed.stdout and "unreadable" in listed.stdout
    assert planted.is_symlink() or planted.exists()  # read-only commands remove nothing
    used = run_reader(cache, "entries")
    assert used.returncode == 0 and used.stdout.strip() == "1", used.stderr
    assert not planted.is_symlink() and not planted.exists()
    assert "not a regular file" in used.stderr or "larger than" in used.stderr


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "huge sparse file", "link to a copy"])
def test_a_planted_state_file_is_read_no_further_than_its_metadata_promises(tmp_path: Path, kind: str) -> None:
    cache = tmp_path / "cache"
    entry = CacheStore(cache, FAKE_SETTINGS).store("p", PreludeKind.PRELUDE, [1, 2, 3], b"s" * 4096)
    plant(cache / f"{entry.name}{STATE_SUFFIX}", kind, tmp_path)
    loaded = run_reader(cache, "load")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "None" and "is invalid" in loaded.stderr
    assert entry_names(cache) == []


def test_touching_an_entry_whose_metadata_became_a_link_touches_nothing_outside(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = CacheStore(cache, FAKE_SETTINGS)
    entry = store.store("p", PreludeKind.PRELUDE, [1, 2, 3], b"s" * 100)
    meta = cache / f"{entry.name}{META_SUFFIX}"
    outside = tmp_path / "outside.json"
    shutil.copy(meta, outside)
    age(outside, 1000)
    before = outside.stat().st_mtime_ns
    meta.unlink()
    meta.symlink_to(outside)
    store.touch(entry)
    assert store.load_state(entry) == b"s" * 100  # from memory; touches the entry again
    assert outside.stat().st_mtime_ns == before
    assert CacheStore(cache, FAKE_SETTINGS).find_exact([1, 2, 3]) is None  # a link is not an entry
    assert outside.stat().st_mtime_ns == before and not meta.is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_planted_model_fingerprint_memo_neither_hangs_nor_floods_memory(tmp_path: Path, kind: str) -> None:
    root = build_workspace(tmp_path / "ws")
    memo = root / "llm_cache" / ".model-fingerprints.json"
    memo.parent.mkdir()
    plant(memo, kind, tmp_path)
    result = subprocess.run(cli_command(root, "cache", "list"), capture_output=True, text=True, timeout=120,
                            preexec_fn=_limit_memory)
    assert result.returncode == 0, result.stderr
    assert "has no cache entries" in result.stdout
