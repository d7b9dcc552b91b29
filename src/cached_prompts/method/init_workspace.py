"""`init [DIR]`: a new workspace, ready to run. Its folders, a `cached-prompts.toml`, and a
small example (a draft, a prelude with one example answer, a test prompt) written in the
configured model's own chat format, read from the GGUF's chat template. Files that exist are
never overwritten.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cached_prompts.method.chat_format import (FORMATS, ChatFormat, ChatFormatKind, chat_template, detect_in_template,
                          detect_in_vocabulary)
from cached_prompts.local.engine import Model, init_backend
from cached_prompts.errors import WorkspaceError
from cached_prompts.local.model_file import resolve_model_path
from cached_prompts.workspace.layout import (CACHE, CONFIG_FILE, DRAFTS, DRAFTS_OUTPUTS, PRELUDE_SEPARATOR, PRELUDES, TEST_PROMPTS,
                        TEST_PROMPTS_OUTPUTS, write_output)

log = logging.getLogger(__name__)

FOLDERS = (DRAFTS, DRAFTS_OUTPUTS, PRELUDES, TEST_PROMPTS, TEST_PROMPTS_OUTPUTS, CACHE, "models")
EXAMPLE = "dictionary"
SYSTEM = "You are a concise dictionary. For each word, reply with one sentence that defines it."
EXCHANGES = [("apple", "A round fruit with crisp white flesh and red, green or yellow skin.")]
DRAFT_WORD = "apple"
TEST_WORD = "river"

CONFIG_TEXT = """\
# Settings of this workspace, by the names of the command-line options (flags override them).
# See `cached-prompts --full-help` for every option.
{model_line}
n_ctx = 4096
# temperature = 0.8
# max_tokens = 256
# stop = ["\\n\\n"]
"""


@dataclass
class InitReport:
    root: Path
    chat_format: ChatFormatKind
    recognised: bool  # False: the model's template is unknown and the plain format was used
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # existed already, left as they were


def init_workspace(root: Path, model_path: str | None, *, verbose: bool = False) -> InitReport:
    """Create the workspace at `root` (and its parents); `model_path` as --lp-model-path gives
    it (None: the configured or default model), written into the config only if given."""
    chat, recognised = model_chat_format(model_path, verbose)
    report = InitReport(root, chat.kind, recognised)
    _make_folder(root, report)
    for name in FOLDERS:
        _make_folder(root / name, report)
    _write_new(root / CONFIG_FILE, CONFIG_TEXT.format(model_line=_model_line(root, model_path)), report)
    prelude = chat.conversation(SYSTEM, EXCHANGES, None)
    test_prompt = chat.conversation(SYSTEM, EXCHANGES, TEST_WORD)[len(prelude):]
    _write_new(root / DRAFTS / f"{EXAMPLE}.txt", chat.conversation(SYSTEM, [], DRAFT_WORD), report)
    _write_new(root / PRELUDES / f"{EXAMPLE}.txt", prelude, report)
    _write_new(root / TEST_PROMPTS / f"{EXAMPLE}{PRELUDE_SEPARATOR}{TEST_WORD}.txt", test_prompt, report)
    return report


def model_chat_format(model_path: str | None, verbose: bool) -> tuple[ChatFormat, bool]:
    """The chat format of the model's own template (else of the turn markers among its
    special tokens), and whether one was recognised."""
    path = resolve_model_path(model_path)
    init_backend(verbose)
    model = Model(path, 0)
    try:
        template = chat_template(model)
        chat = detect_in_template(template) if template else None
        if chat is None:
            chat = detect_in_vocabulary(model)
            if chat is not None:
                log.warning("the model %s %s; its vocabulary has the turn markers of the %s format, so the "
                            "example uses that format", path.name, _no_template(template), chat.kind.value)
    finally:
        model.close()
    if chat is None:
        log.warning("the model %s %s, and no known turn markers are among its special tokens; the example "
                    "uses the plain 'user'/'bot' lines: rewrite it in the model's format", path.name,
                    _no_template(template))
        return FORMATS[ChatFormatKind.PLAIN], False
    return chat, True


def _no_template(template: str | None) -> str:
    return "has no chat template" if not template else "has a chat template of a format this tool does not know"


def _model_line(root: Path, model_path: str | None) -> str:
    if model_path is None:
        return '# model_path = "models/MODEL.gguf"   # default: the embedded SmolLM2-135M-Instruct'
    path = Path(model_path).expanduser().resolve()
    try:
        shown = path.relative_to(root.resolve()).as_posix()
    except ValueError:
        shown = str(path)
    return f"model_path = {_toml_string(shown)}"


def _toml_string(text: str) -> str:
    """A TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if ord(c) >= 32 and ord(c) != 127 else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _make_folder(path: Path, report: InitReport) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        try:
            path.mkdir(parents=True)
        except OSError as error:
            raise WorkspaceError(f"cannot create {path}: {error.strerror or error}; check the path and "
                                 "its permissions") from None
        report.created.append(path)
        return
    if stat.S_ISLNK(mode) and path.is_dir():
        report.kept.append(path)  # a linked folder is the user's choice (e.g. models/ elsewhere)
    elif not stat.S_ISDIR(mode):
        raise WorkspaceError(f"{path} exists and is not a folder; move it away or choose another folder")
    else:
        report.kept.append(path)


def _write_new(path: Path, text: str, report: InitReport) -> None:
    if os.path.lexists(path):
        report.kept.append(path)
        return
    write_output(path, text)
    report.created.append(path)
