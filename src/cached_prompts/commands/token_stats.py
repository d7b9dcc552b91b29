"""`show-stats-on-tokens-number`: how many tokens every input and combination takes.

Combinations are counted as the model sees them, the concatenated text tokenized as one
(backend.py, "joint tokens"), so the sums add up to what a request really takes: a prompt
`Q` after its prelude `P` adds `T - P` tokens where `T` counts prelude + prompt together
(usually its own count; one less or more when the split falls inside a word).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cached_prompts.backend.interface import Backend
from cached_prompts.errors import InputFileError
from cached_prompts.workspace.layout import (DRAFTS, DRAFTS_OUTPUTS, PRELUDES, TEST_PROMPTS, TEST_PROMPTS_OUTPUTS,
                                             Workspace, printable)
from cached_prompts.workspace.outputs import OutputSet


@dataclass
class FileTokens:
    name: str
    tokens: int | None  # the file alone; None: it could not be read
    problem: str = ""
    prelude: tuple[str, int] | None = None  # (prelude file name, its tokens)
    together: int | None = None  # prelude + this file, tokenized as one text
    outputs: list[tuple[str, int]] = field(default_factory=list)  # (file name, tokens it adds)

    @property
    def with_prelude(self) -> int:
        """Tokens of the input with its prelude (if any), as the model sees them."""
        return self.together if self.together is not None else (self.tokens or 0)


@dataclass
class TokenStats:
    context_length: int
    folders: dict[str, list[FileTokens]]


def token_stats(workspace: Workspace, backend: Backend) -> TokenStats:
    """Token counts of every input, of each test prompt with its prelude, and of outputs."""
    preludes: dict[Path, tuple[str, int]] = {}  # path -> (text, tokens)

    def count(text: str) -> int:
        return backend.count_tokens(text, at_start=True)

    folders: dict[str, list[FileTokens]] = {DRAFTS: [], PRELUDES: [], TEST_PROMPTS: []}
    for path in workspace.drafts():
        item, text = _read_counted(workspace, path, count)
        if text is not None:
            item.outputs = _outputs(OutputSet.for_draft(workspace, path), text, item.tokens, count)
        folders[DRAFTS].append(item)
    for path in workspace.preludes():
        item, text = _read_counted(workspace, path, count)
        if text is not None:
            preludes[path] = (text, item.tokens)
        folders[PRELUDES].append(item)
    for path in workspace.test_prompt_files():
        item, text = _read_counted(workspace, path, lambda t: backend.count_tokens(t, at_start=False))
        folders[TEST_PROMPTS].append(item)
        try:
            outputs = OutputSet.for_test_prompt(workspace, path)
        except InputFileError as error:
            item.problem = str(error)
            continue
        if text is None or outputs.prelude not in preludes:
            continue
        prelude_text, prelude_count = preludes[outputs.prelude]
        item.prelude = (outputs.prelude.name, prelude_count)
        item.together = count(prelude_text + text)
        item.outputs = _outputs(outputs, prelude_text + text, item.together, count)
    return TokenStats(backend.n_ctx, folders)


def _read_counted(workspace: Workspace, path: Path, count: Callable[[str], int]) -> tuple[FileTokens, str | None]:
    try:
        text = workspace.read_input(path)
    except InputFileError as error:
        return FileTokens(path.name, None, problem=str(error)), None
    return FileTokens(path.name, count(text)), text


def _outputs(output_set: OutputSet, text_before: str, tokens_before: int,
             count: Callable[[str], int]) -> list[tuple[str, int]]:
    """(name, tokens the output adds after `text_before`) of each existing output."""
    outputs = []
    for output in output_set.existing().values():
        try:
            text = output_set.workspace.read_input(output)
        except InputFileError:
            continue
        outputs.append((output.name, count(text_before + text) - tokens_before))
    return outputs


# ----- rendering: the original tool's format ------------------------------------------------------

OUTPUT_FOLDERS = {DRAFTS: DRAFTS_OUTPUTS, PRELUDES: None, TEST_PROMPTS: TEST_PROMPTS_OUTPUTS}


def render_text(stats: TokenStats) -> str:
    """The format the original tool printed: paths from the workspace root, sums that add up."""
    lines = [f"Context length: {stats.context_length}"]
    for folder, files in stats.folders.items():
        lines += ["", f'# Repository "{folder}"', ""]
        for item in files:
            lines += _render_file(folder, item, stats.context_length)
    return "\n".join(lines)


def _render_file(folder: str, item: FileTokens, n_ctx: int) -> list[str]:
    shown = printable(item.name)
    if item.tokens is None:
        return [f'"{folder}/{shown}" unreadable: {item.problem}']
    lines = [f'"{folder}/{shown}" tokens: {item.tokens}']
    if item.problem:
        lines.append(f"! {item.problem}")
    outputs_folder = OUTPUT_FOLDERS[folder]
    indent = ""
    base_sum = f"{item.tokens}"
    if item.prelude is not None and item.together is not None:
        name, prelude_count = item.prelude
        name = printable(name)
        added = item.together - prelude_count
        lines.append(f'- with its prelude "{PRELUDES}/{name}": {prelude_count} + {added} = '
                     f"{item.together}{_over(item.together, n_ctx)}")
        indent, base_sum = "  ", f"{prelude_count} + {added}"
    for name, count in item.outputs:
        name = printable(name)
        total = item.with_prelude + count
        lines.append(f'{indent}* with its output "{outputs_folder}/{name}": {count} + {base_sum} = '
                     f"{total}{_over(total, n_ctx)}")
    return lines


def _over(total: int, n_ctx: int) -> str:
    return f"  (over the context by {total - n_ctx})" if total > n_ctx else ""


def render_json(stats: TokenStats) -> str:
    return json.dumps(asdict(stats), ensure_ascii=False, indent=1)
