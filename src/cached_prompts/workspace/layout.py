"""The workspace: its folders and input files (outputs and their freshness: outputs.py)."""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cached_prompts.errors import InputFileError, OptionsError, WorkspaceError
from cached_prompts.fs.files import atomic_write_text, remove_stale_temp_files
from cached_prompts.fs.regular import kind_of, read_regular

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


FOLLOW_LINKS_HINT = ("copy the file into the workspace, or allow links out of it with --follow-links-outside "
                     "(follow_links_outside = true in cached-prompts.toml)")


def printable(name: str) -> str:
    """A file name for a line of text: control characters (a newline...) escaped, as in
    Python's repr, so that one name is one line; other characters (Cyrillic, ...) unchanged."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in name)


def read_input_text(path: Path) -> str:
    """Read a UTF-8 input file; a decoding error names the file and the byte offset. A link
    to a regular file is read (whether it may lead out of the workspace is for
    Workspace.read_input to say); a FIFO, a device or a file over MAX_INPUT_BYTES is refused."""
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
    """A workspace folder. It may come from someone else (a git clone), so a link in it is
    followed only to a target inside it, unless `follow_links_outside`."""

    root: Path
    follow_links_outside: bool = False

    def with_options(self, options: Any) -> "Workspace":
        """The same workspace with the link rule of `options` (EngineOptions)."""
        return dataclasses.replace(self, follow_links_outside=options.follow_links_outside)

    def read_input(self, path: Path) -> str:
        """The text of a workspace input (read_input_text), refusing a link out of the workspace."""
        self.check_link(path)
        return read_input_text(path)

    def check_link(self, path: Path) -> None:
        """InputFileError if a link on the way from the root to `path` (the file, or a folder
        such as preludes/) leads outside the workspace and such links are not allowed."""
        link = self.outside_link(path)
        if link is not None:
            raise InputFileError(f"{self.shown(link)} is a symbolic link to {os.readlink(link)}, outside the "
                                 f"workspace, and is not followed (a workspace may come from someone else); "
                                 f"{FOLLOW_LINKS_HINT}")

    def outside_link(self, path: Path) -> Path | None:
        """The first link between the root and `path` whose target is outside the workspace."""
        if self.follow_links_outside:
            return None
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return None  # not a path in the workspace
        root = self.root.resolve()
        current = self.root
        for part in parts:
            current = current / part
            if current.is_symlink() and not current.resolve().is_relative_to(root):
                return current
        return None

    def shown(self, path: Path) -> str:
        """A workspace path as messages name it: `test_prompts/a---b.txt`."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

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
        """The `*.txt` entries of an input folder but folders, sorted by name; a missing folder
        has none. A FIFO or device is listed too: reading it fails with a message that names it
        (it is skipped with that message, not in silence)."""
        folder = self.folder(folder_name)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.exists() and not p.is_dir())

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
        if not prelude_path.exists():
            raise InputFileError(
                f"{path.name}: its prelude {PRELUDES}/{prelude_name}.txt does not exist; "
                "create it or rename the prompt")
        mode = prelude_path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise InputFileError(f"{path.name}: its prelude {PRELUDES}/{prelude_name}.txt is {kind_of(mode)}, "
                                 "not a file; put the prelude's text in a regular file")
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
