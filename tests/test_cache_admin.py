"""The `cache` commands (list, size, prune, clear) and the size option, on a real cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cached_prompts.local import backend as local_backend, engine
from cached_prompts.cache.store import META_SUFFIX, STATE_SUFFIX, folder_size, settings_key_of, tokens_digest
from cached_prompts.options import EngineOptions, build_options, parse_size

from .conftest import age, write

ONE_THREAD = ("--n_threads", "1")


def entry_names(cache: Path) -> list[str]:
    return sorted(p.name[: -len(META_SUFFIX)] for p in cache.glob(f"*{META_SUFFIX}"))


def clone_for_other_model(cache: Path, name: str, label: str) -> str:
    """A valid copy of an entry that belongs to another model file."""
    meta = json.loads((cache / f"{name}{META_SUFFIX}").read_text())
    meta["settings"] = meta["settings"] | {"model_sha256": "f" * 64}
    meta["settings_key"] = settings_key_of(meta["settings"])
    meta["model_path"] = "/models/other-model.gguf"
    meta["label"] = label
    new_name = f"{label}.{tokens_digest(meta['settings_key'], meta['tokens'])}"
    shutil.copy(cache / f"{name}{STATE_SUFFIX}", cache / f"{new_name}{STATE_SUFFIX}")
    (cache / f"{new_name}{META_SUFFIX}").write_text(json.dumps(meta))
    return new_name


@pytest.fixture
def cached(workspace: Path, cli) -> Path:
    """The conftest workspace with its two preludes cached and one entry of another model."""
    code, _, err = cli(workspace, *ONE_THREAD, "precache-preludes")
    assert code == 0, err
    cache = workspace / "llm_cache"
    (short,) = [n for n in entry_names(cache) if n.startswith("dictionary.")]
    clone_for_other_model(cache, short, "elsewhere")
    for offset, name in enumerate(entry_names(cache)):
        age(cache / f"{name}{META_SUFFIX}", 100 + 10 * offset)  # a known order of last use
    return workspace


def test_list_shows_every_entry_and_marks_those_of_the_configured_model(cached: Path, cli) -> None:
    code, out, _ = cli(cached, "cache", "list", "--json")
    assert code == 0
    items = {item["label"]: item for item in json.loads(out)}
    assert sorted(items) == ["dictionary", "dictionary-long", "elsewhere"]
    assert items["elsewhere"]["usable"] is False and items["elsewhere"]["model_file"] == "other-model.gguf"
    assert items["dictionary"]["usable"] is True and items["dictionary-long"]["usable"] is True
    assert items["dictionary-long"]["tokens"] > items["dictionary"]["tokens"] > 0
    assert all(item["size_bytes"] > 0 and item["kind"] == "prelude" for item in items.values())
    code, out, _ = cli(cached, "cache", "list")
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["LAST", "USED", "KIND"] and lines[-1].startswith("3 entries")
    rows = {line.split()[-1]: line for line in lines[1:-1]}
    assert rows["dictionary"].startswith("*") and not rows["elsewhere"].startswith("*")
    assert "other-model.gguf" in rows["elsewhere"] and "SmolLM2" in rows["dictionary"]


def test_list_does_not_load_the_model(cached: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache list must not load the model")

    monkeypatch.setattr(engine.Model, "__init__", refuse)
    monkeypatch.setattr(local_backend.LocalBackend, "__init__", refuse)
    for action in ("list", "size"):
        code, out, err = cli(cached, "cache", action)
        assert code == 0 and out, err


def test_size_reports_the_folder_total_and_the_limit(cached: Path, cli) -> None:
    code, out, _ = cli(cached, "--cache-max-size", "500M", "cache", "size", "--json")
    report = json.loads(out)
    assert code == 0 and report["entries"] == 3
    assert report["total_bytes"] == folder_size(cached / "llm_cache") >= report["entry_bytes"] > 0
    assert report["limit_bytes"] == 500 << 20
    code, out, _ = cli(cached, "cache", "size")
    assert "3 entries" in out and "limit 4.0 GiB" in out


def test_prune_removes_least_recently_used_entries_down_to_the_size(cached: Path, cli) -> None:
    cache = cached / "llm_cache"
    names = entry_names(cache)
    oldest = names[-1]  # aged the most by the fixture
    target = folder_size(cache) - 1
    code, out, err = cli(cached, "cache", "prune", "--max-size", str(target), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [item["name"] for item in report["removed"]] == [oldest]
    assert report["total_bytes"] == folder_size(cache) <= target
    assert entry_names(cache) == sorted(set(names) - {oldest})
    code, out, _ = cli(cached, "cache", "prune", "--max-size", "0")
    assert code == 0 and out.strip().splitlines()[-1].startswith("2 entries removed")
    assert entry_names(cache) == []


def test_clear_removes_every_entry_of_every_model(cached: Path, cli) -> None:
    cache = cached / "llm_cache"
    code, out, _ = cli(cached, "cache", "clear")
    assert code == 0 and "3 entries removed" in out
    assert entry_names(cache) == [] and not list(cache.glob(f"*{STATE_SUFFIX}"))
    code, out, _ = cli(cached, "cache", "clear", "--json")
    assert code == 0 and json.loads(out)["removed"] == []
    code, out, _ = cli(cached, "cache", "list")
    assert code == 0 and "has no cache entries" in out


def test_bad_sizes_are_one_clear_error(workspace: Path, cli) -> None:
    code, out, err = cli(workspace, "cache", "prune", "--max-size", "lots")
    assert code == 1 and out == "" and "'lots' is not a size" in err
    code, _, err = cli(workspace, "--cache-max-size=-3G", "cache", "size")
    assert code == 1 and "cache_max_size" in err and "500M or 2G" in err
    write(workspace / "cached-prompts.toml", "cache_max_size = true\n")
    code, _, err = cli(workspace, "cache", "size")
    assert code == 1 and "cache_max_size" in err and "cached-prompts.toml" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("500M", 500 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("64 kb", 64 << 10),
    ("1T", 1 << 40)])
def test_sizes_are_parsed_in_powers_of_1024(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert build_options(EngineOptions, {"cache_max_size": text}, "test").cache_max_bytes == expected


def test_the_size_option_takes_bytes_from_the_config_and_defaults_to_4g() -> None:
    assert EngineOptions().cache_max_bytes == 4 << 30
    assert build_options(EngineOptions, {"cache_max_size": 123456}, "test").cache_max_bytes == 123456


def _plant_unreadable_entries(cache: Path) -> dict[str, str]:
    """An entry of a newer format and one with damaged metadata; name -> why it is unreadable."""
    (newest,) = [n for n in entry_names(cache) if n.startswith("dictionary-long.")]
    meta = cache / f"{newest}{META_SUFFIX}"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"format": 99}))
    damaged = f"damaged.{'b' * 20}"
    (cache / f"{damaged}{META_SUFFIX}").write_text("{not json")
    shutil.copy(cache / f"{newest}{STATE_SUFFIX}", cache / f"{damaged}{STATE_SUFFIX}")
    return {newest: "format 99", damaged: "unreadable metadata"}


def test_list_and_size_never_remove_entries_they_cannot_read(cached: Path, cli) -> None:
    cache = cached / "llm_cache"
    unreadable = _plant_unreadable_entries(cache)
    files = sorted(p.name for p in cache.iterdir())
    code, out, err = cli(cached, "cache", "list", "--json")
    assert code == 0, err
    items = {item["name"]: item for item in json.loads(out)}
    for name, why in unreadable.items():
        assert items[name]["usable"] is False and why in items[name]["problem"]
        assert items[name]["size_bytes"] > 0
    (readable,) = [n for n in entry_names(cache) if n.startswith("dictionary.")]
    assert items[readable]["problem"] == "" and items[readable]["usable"] is True
    code, out, err = cli(cached, "cache", "list")
    assert code == 0 and "2 unreadable" in out.splitlines()[-1], out
    assert all(any(name.split(".")[0] in line and "unreadable" in line for line in out.splitlines())
               for name in unreadable)
    code, out, err = cli(cached, "cache", "size", "--json")
    report = json.loads(out)
    assert code == 0 and report["entries"] == 2 and report["unreadable"] == 2
    code, out, err = cli(cached, "cache", "size")
    assert code == 0 and "2 unreadable" in out
    assert sorted(p.name for p in cache.iterdir()) == files
    assert "removed" not in err and "is invalid" not in err
    code, out, err = cli(cached, "cache", "clear")
    assert code == 0 and entry_names(cache) == [] and not list(cache.glob(f"*{STATE_SUFFIX}"))
