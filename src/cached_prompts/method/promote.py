"""`promote DRAFT K`: the seed's step 3 as a command. A finished prelude is the draft, the
answer the user chose (output K, perhaps edited) and the opening of the next user turn, so
that the answer becomes a few-shot example the model finds natural.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cached_prompts.method.chat_format import ChatFormatKind, detect
from cached_prompts.errors import InputFileError
from cached_prompts.workspace.layout import DRAFTS, DRAFTS_OUTPUTS, PRELUDE_SEPARATOR, PRELUDES, Workspace, write_output
from cached_prompts.workspace.outputs import OutputSet, StaleReason, judge_output

log = logging.getLogger(__name__)

SHOWN_NAMES = 10


@dataclass(frozen=True)
class Promoted:
    path: Path
    chat_format: ChatFormatKind | None  # None: --next-turn gave the opening
    next_turn: str


@dataclass(frozen=True)
class PromotedText:
    """What `promote` writes for one output, before it is written."""

    text: str
    chat_format: ChatFormatKind | None  # None: --next-turn gave the opening
    next_turn: str


def promote(workspace: Workspace, draft: str, k: int, *, name: str | None = None, force: bool = False,
            next_turn: str | None = None) -> Promoted:
    """Write preludes/NAME.txt = draft + output K + the next user turn's opening."""
    draft_path = draft_path_of(workspace, draft)
    if k < 0:
        raise InputFileError(f"K = {k}: output numbers start at 0")
    outputs = OutputSet.for_draft(workspace, draft_path)
    output_path = outputs.path(k)
    if not output_path.is_file():
        raise InputFileError(_missing_output(outputs, output_path, k))
    target = workspace.folder(PRELUDES) / f"{_prelude_name(name if name is not None else draft_path.stem)}.txt"
    _check_target(target, force)
    draft_text, answer = workspace.read_input(draft_path), workspace.read_input(output_path)
    if judge_output(str(k), output_path, [draft_path], None, None).reason is StaleReason.OLDER:
        log.warning("%s/%s is older than the draft: it answers an earlier version of it",
                    DRAFTS_OUTPUTS, output_path.name)
    promoted = promoted_text(draft_path, draft_text, answer, next_turn)
    write_output(target, promoted.text)
    return Promoted(target, promoted.chat_format, promoted.next_turn)


def promoted_text(draft_path: Path, draft_text: str, answer: str, next_turn: str | None = None) -> PromotedText:
    """draft + answer + the next user turn's opening (from the draft's chat format unless
    `next_turn` gives it): the prelude `promote` writes, and `pick` tries in memory."""
    chat = detect(draft_text)
    if next_turn is None:
        if chat is None:
            raise InputFileError(f"{DRAFTS}/{draft_path.name} has no turn markers of a known chat format "
                                 "(ChatML, Llama 3, Gemma, Mistral, or lines 'user'/'bot'); give the "
                                 "opening of the next user turn with --next-turn TEXT")
        next_turn = chat.next_turn
        if chat.kind == ChatFormatKind.PLAIN and answer.endswith("\n"):
            next_turn = next_turn.removeprefix("\n")  # the answer already ends its line
    return PromotedText(draft_text + answer + next_turn, chat.kind if chat else None, next_turn)


def check_prelude_target(workspace: Workspace, name: str, force: bool) -> Path:
    """preludes/NAME.txt if `promote` may write it (a valid name; -f to overwrite)."""
    target = workspace.folder(PRELUDES) / f"{_prelude_name(name)}.txt"
    _check_target(target, force)
    return target


def draft_path_of(workspace: Workspace, draft: str) -> Path:
    """prelude_drafts/NAME.txt from NAME, NAME.txt or prelude_drafts/NAME.txt."""
    stem = Path(draft).name.removesuffix(".txt")
    path = workspace.folder(DRAFTS) / f"{stem}.txt"
    if not stem or not path.is_file():
        drafts = [p.stem for p in workspace.drafts()]
        known = ", ".join(drafts[:SHOWN_NAMES]) + (", ..." if len(drafts) > SHOWN_NAMES else "")
        raise InputFileError(f"there is no draft {DRAFTS}/{stem}.txt; "
                             + (f"the drafts are: {known}" if drafts else f"{DRAFTS}/ has no drafts"))
    return path


def _missing_output(outputs: OutputSet, output: Path, k: int) -> str:
    existing = [p.name for p in outputs.existing().values()]
    have = f"it has {', '.join(existing)}" if existing else "it has none yet"
    return (f"{DRAFTS_OUTPUTS}/{output.name} does not exist ({have}); run outputs-for-drafts "
            f"(-n {k + 1} or more) first")


def _prelude_name(name: str) -> str:
    """A prelude name that test prompts can refer to, or InputFileError."""
    name = name.removesuffix(".txt")
    problem = None
    bad = next((c for c in name if c in "/\\" or ord(c) < 32), None)
    if not name.strip() or name in (".", ".."):
        problem = "is empty or names a folder"
    elif bad is not None:  # before the leading '.': '../x' is refused for its '/'
        problem = f"contains {bad!r} (a prelude is a file in preludes/, its name has no '/', '\\' or control character)"
    elif name.startswith("."):
        problem = "starts with '.' (hidden files are not preludes)"
    elif PRELUDE_SEPARATOR in name:
        problem = (f"contains '{PRELUDE_SEPARATOR}', which separates a test prompt's prelude from its id, "
                   "so no test prompt could use it")
    if problem:
        raise InputFileError(f"the prelude name {name!r} {problem}; choose another with --as NAME")
    return name


def _check_target(target: Path, force: bool) -> None:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise InputFileError(f"{PRELUDES}/{target.name} is a folder; remove it or choose another name with --as")
    if not force:
        raise InputFileError(f"{PRELUDES}/{target.name} already exists; pass -f to overwrite it, or "
                             "choose another name with --as NAME")
