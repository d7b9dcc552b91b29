"""The workspace: its folders and input files (outputs and their freshness: outputs.py)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cached_prompts.errors import InputFileError, OptionsError, WorkspaceError
from cached_prompts.fs.files import atomic_write_text, remove_stale_temp_files
from cached_prompts.fs.regular import read_regular

DRAFTS = "prelude_drafts"
DRAFTS_OUTPUTS = "prelude_drafts_outputs"
PRELUDES = "preludes"
TEST_PROMPTS = "test_prompts"
TEST_PROMPTS_OUTPUTS = "test_prompts_outputs"
CACHE = "llm_cache"
CONFIG_FILE = "cached-prompts.toml"
PRELUDE_SEPARATOR = "---"
DETERMINISTIC = "deterministic"


MAX_INPUT_BYTES = 16 << 20  # far more text than any context holds


def read_input_text(path: Path) -> str:
    """Read a UTF-8 input file; a decoding error names the file and the byte offset. A link
    to a regular file is read (a prelude shared between workspaces); a FIFO, a device or a
    file over MAX_INPUT_BYTES is refused."""
    try:
        data, _ = read_regular(path, MAX_INPUT_BYTES, follow_symlinks=True)
    except FileNotFoundError:
        raise InputFileError(f"{path} does not exist") from None
    except OSError as error:
        raise InputFileError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(
            f"{path} is not UTF-8 text (bad byte at offset {error.start}); "
            "save it as UTF-8 and run again") from None


@dataclass(frozen=True)
class TestPrompt:
    path: Path
    prelude_path: Path

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass(frozen=True)
class Workspace:
    root: Path

    def folder(self, name: str) -> Path:
        return self.root / name

    @property
    def cache_dir(self) -> Path:
        return self.folder(CACHE)

    def check_exists(self) -> None:
        if not self.root.is_dir():
            raise WorkspaceError(f"workspace folder {self.root} does not exist; "
                                 "create it or pass --root with an existing folder")

    def inputs(self, folder_name: str) -> list[Path]:
        """The `*.txt` files of an input folder, sorted by name; a missing folder has none."""
        folder = self.folder(folder_name)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())

    def drafts(self) -> list[Path]:
        return self.inputs(DRAFTS)

    def preludes(self) -> list[Path]:
        return self.inputs(PRELUDES)

    def test_prompt_files(self) -> list[Path]:
        return self.inputs(TEST_PROMPTS)

    def test_prompt(self, path: Path) -> TestPrompt:
        """Resolve the prelude of `PRELUDE---ID.txt`; raises InputFileError if it has none."""
        if PRELUDE_SEPARATOR not in path.stem:
            raise InputFileError(
                f"{path.name}: a test prompt's name must be PRELUDE{PRELUDE_SEPARATOR}ID.txt, "
                f"naming its prelude in {PRELUDES}/; rename it")
        prelude_name = path.stem.split(PRELUDE_SEPARATOR, 1)[0]
        prelude_path = self.folder(PRELUDES) / f"{prelude_name}.txt"
        if not prelude_path.is_file():
            raise InputFileError(
                f"{path.name}: its prelude {PRELUDES}/{prelude_name}.txt does not exist; "
                "create it or rename the prompt")
        return TestPrompt(path, prelude_path)

    def load_config(self) -> dict[str, Any]:
        """Options from `cached-prompts.toml` at the root; relative model paths are made absolute."""
        path = self.root / CONFIG_FILE
        if not path.is_file():
            return {}
        try:
            values = tomllib.loads(read_input_text(path))
        except tomllib.TOMLDecodeError as error:
            raise OptionsError(f"{path}: not valid TOML ({error}); fix the file") from None
        model_path = values.get("model_path")
        if isinstance(model_path, str) and not Path(model_path).is_absolute():
            values["model_path"] = str(self.root / model_path)
        return values


def remove_stale_output_temp_files(workspace: Workspace) -> list[Path]:
    """Remove the temp files that killed runs left in the output folders (a write in progress
    in another process is left alone, see fs/files.py); returns the removed files."""
    return [path for name in (DRAFTS_OUTPUTS, TEST_PROMPTS_OUTPUTS)
            for path in remove_stale_temp_files(workspace.folder(name))]


def write_output(path: Path, text: str) -> None:
    atomic_write_text(path, text)
