"""The command line of the seed's method: `promote`, `score-preludes`, `init`, `check`, `pick`
(their flags, their call into the library, their output): the entries in `COMMANDS` join the
command table of main.py.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cached_prompts.cli.command import Command, Invocation, Needs
from cached_prompts.commands import check as check_module
from cached_prompts.commands import pick as pick_module
from cached_prompts.method.chat_format import FORMATS, AnswerMarkers, detect
from cached_prompts.errors import OptionsError
from cached_prompts.method.init_workspace import init_workspace
from cached_prompts.method.promote import promote
from cached_prompts.method.scoring import render_json, render_text, score_preludes, write_scores_file
from cached_prompts.options import SamplingOptions
from cached_prompts.workspace.layout import Workspace

log = logging.getLogger(__name__)


def _add_promote_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("draft_name", metavar="DRAFT", help="the draft's name (prelude_drafts/DRAFT.txt)")
    parser.add_argument("k", metavar="K", type=int, help="which output: prelude_drafts_outputs/DRAFT.output-K.txt")
    parser.add_argument("--as", dest="as_name", metavar="NAME", default=None,
                        help="write preludes/NAME.txt (default: the draft's name)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite an existing prelude")
    parser.add_argument("--next-turn", metavar="TEXT", default=None,
                        help="the opening of the next user turn (default: from the draft's chat format, "
                             "e.g. '<|im_end|>\\n<|im_start|>user\\n' for ChatML)")


def _add_score_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument("--answer-marker", metavar="START", default=None,
                        help="example answers start after this text (default: the assistant turns of "
                             "the prelude's chat format)")
    parser.add_argument("--answer-end", metavar="END", action="append", default=None,
                        help="an example answer ends before this text (repeatable; default with "
                             "--answer-marker: the chat format's end of turn, else a newline)")


def _add_init_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", nargs="?", type=Path, default=None,
                        help="the workspace folder to create (default: --root, else the current folder)")


def _add_check_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print every rate and output as JSON")


def _add_pick_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("draft_name", metavar="DRAFT", help="the draft's name (prelude_drafts/DRAFT.txt); its outputs "
                                                       "are the candidates")
    parser.add_argument("--for", dest="for_prelude", metavar="PRELUDE", default=None,
                        help="run the test prompts PRELUDE---*.txt (default: the draft's name)")
    how_many = parser.add_mutually_exclusive_group()
    how_many.add_argument("-n", type=int, default=5, metavar="N", help="sampled answers per test prompt (default: 5)")
    how_many.add_argument("-d", "--deterministic", action="store_true",
                        help="one greedy answer per test prompt instead (a deterministic ranking)")
    parser.add_argument("--promote", action="store_true", help="write the winner as promote does")
    parser.add_argument("--as", dest="as_name", metavar="NAME", default=None,
                        help="with --promote: write preludes/NAME.txt (default: PRELUDE)")
    parser.add_argument("-f", "--force", action="store_true", help="with --promote: overwrite an existing prelude")
    parser.add_argument("--next-turn", metavar="TEXT", default=None,
                        help="the opening of the next user turn (default: from the draft's chat format)")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")


def _run_init(invocation: Invocation) -> int:
    args = invocation.args
    root = (args.dir or Path(getattr(args, "root", Path.cwd()))).resolve()
    report = init_workspace(root, getattr(args, "model_path", None), verbose=invocation.verbose)
    for path in report.created:
        print(path)
    log.info("workspace %s: %d created, %d already there (kept as they were); the example is in the %s "
             "format%s", root, len(report.created), len(report.kept), report.chat_format.value,
             "" if report.recognised else " (the model's own format was not recognised)")
    return 0


def _run_check(invocation: Invocation) -> int:
    with invocation.open_backend() as backend:  # which model made the outputs is part of their freshness
        return print_check(invocation.workspace, backend, invocation.sampling,
                           as_json=invocation.args.json)


def _run_promote(invocation: Invocation) -> int:
    args, workspace = invocation.args, invocation.workspace
    promoted = promote(workspace, args.draft_name, args.k, name=args.as_name, force=args.force,
                       next_turn=args.next_turn)
    print(promoted.path.relative_to(workspace.root).as_posix())
    log.info("%s = draft + output %d + %r (%s)", promoted.path.name, args.k, promoted.next_turn,
             promoted.chat_format.value + " format" if promoted.chat_format else "--next-turn")
    return 0


def _run_score_preludes(invocation: Invocation) -> int:
    markers = _answer_markers(invocation.args)
    with invocation.open_backend() as backend:
        scores, skipped = score_preludes(invocation.workspace, backend, markers)
        if scores:
            write_scores_file(invocation.workspace, backend, scores)
    print(render_json(scores) if invocation.args.json else render_text(scores))
    return 1 if skipped else 0


def print_check(workspace: Workspace, backend: Backend, sampling: SamplingOptions | None, *,
                as_json: bool) -> int:
    """`check` (also `outputs-test-prompts --check`): print the report; 1 if any input is
    under its threshold or was skipped. Outputs are judged as a run with `sampling` by
    `backend` (its model and draft mode) would judge them."""
    report = check_module.check_with_backend(workspace, backend, sampling)
    print(json.dumps(check_module.to_json(report), ensure_ascii=False, indent=2) if as_json
          else check_module.render_text(report))
    if report.unchecked:
        log.info("%d inputs have no expectations: %s", len(report.unchecked), ", ".join(report.unchecked[:5])
                 + (", ..." if len(report.unchecked) > 5 else ""))
    for item in report.failing:
        log.warning("%s: %d of %d outputs passed, under its threshold %g", item.input, item.rate.passed,
                    item.rate.total, item.expectations.threshold)
    return 0 if report.ok else 1


def _run_pick(invocation: Invocation) -> int:
    args, workspace, sampling = invocation.args, invocation.workspace, invocation.sampling or SamplingOptions()
    if (args.as_name is not None or args.force) and not args.promote:
        raise OptionsError("--as and -f go with --promote")
    with invocation.open_backend() as backend:
        result = pick_module.pick(workspace, backend, args.draft_name, sampling, prelude_name=args.for_prelude, n=args.n,
                                  deterministic=args.deterministic, promote_as=args.as_name,
                                  promote_winner=args.promote, force=args.force, next_turn=args.next_turn)
        counters = backend.counters
        log.info("prelude tokens: %d computed, %d reused from the draft's state", counters.prelude_tokens_computed,
                 counters.prelude_tokens_reused)
    print(json.dumps(pick_module.to_json(result), ensure_ascii=False, indent=2) if args.json
          else pick_module.render_text(result))
    if args.promote and result.winner is None:
        log.error("nothing promoted: no candidate reaches every test prompt's threshold")
    return 0 if result.winner is not None and not result.skipped else 1


def _answer_markers(args: argparse.Namespace) -> AnswerMarkers | None:
    if args.answer_marker is None:
        if args.answer_end:
            raise OptionsError("--answer-end needs --answer-marker START (where the answers begin)")
        return None
    if not args.answer_marker:
        raise OptionsError("--answer-marker must not be empty")
    ends = tuple(e for e in (args.answer_end or []) if e)
    if args.answer_end and not ends:
        raise OptionsError("--answer-end must not be empty")
    if not ends:
        chat = detect(args.answer_marker)
        ends = FORMATS[chat.kind].answer_ends if chat is not None else ("\n",)
    return AnswerMarkers(args.answer_marker, ends)


COMMANDS = (
    Command("promote", "make preludes/NAME.txt from a draft, its output K and the opening of the next user turn",
            _run_promote, add_arguments=_add_promote_arguments),
    Command("score-preludes", "how natural each example answer of each prelude is to the model (mean "
            "log-probability)", _run_score_preludes, add_arguments=_add_score_arguments),
    Command("init", "create a workspace: its folders, cached-prompts.toml and an example in the model's chat format",
            _run_init, needs=Needs.ARGUMENTS, add_arguments=_add_init_arguments),
    Command("check", "check the outputs against their expectations (NAME.expect.toml): pass rates with 95% intervals",
            _run_check, add_arguments=_add_check_arguments),
    Command("pick", "rank a draft's outputs as its example answer by the pass rate of the test prompts' expectations",
            _run_pick, add_arguments=_add_pick_arguments),
)
