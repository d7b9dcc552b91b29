"""Command-line interface: parse, call the library, render. Nothing else lives here. The
commands are one table (`COMMANDS`, of cli/command.py's `Command`s, with those of method.py
and watch.py) from which both the parser and the dispatch are built."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import select
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from cached_prompts.cli import method as method_cli
from cached_prompts.cli import watch as watch_cli
from cached_prompts.cli.command import Command, Invocation, Needs, table
from cached_prompts.commands import cache_admin, token_stats
from cached_prompts.commands import outputs as commands
from cached_prompts.errors import CachedPromptsError, OptionsError
from cached_prompts.options import OPTION_MODELS, EngineOptions, SamplingOptions, ServerOptions, server_options, split_by_model
from cached_prompts.workspace.layout import Workspace

log = logging.getLogger("cached_prompts")

DESCRIPTION = """\
A workbench for prompts run through llama.cpp. Each prelude's model state is computed once,
kept in llm_cache/, and every later request starts from it. Work happens in a workspace
folder (--root, default: the current folder) with prelude_drafts/, preludes/, test_prompts/."""

# ----- parser ---------------------------------------------------------------------------------


def _arg_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    origin = get_origin(annotation)
    if origin is Literal:
        values = get_args(annotation)
        return type(values[0]), values
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _arg_type(inner[0])
    if origin is list:
        return str, None
    return annotation, None


def _add_option_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra or {}
        if "flag" not in extra:
            continue  # set by a command's own flag (report: --report)
        arg_type, choices = _arg_type(info.annotation)
        default = info.get_default(call_default_factory=True)
        if arg_type is bool:  # a switch: given means true (false is the default)
            parser.add_argument(extra["flag"], dest=name, action="store_true", default=argparse.SUPPRESS,
                                help=extra["help"])
            continue
        help_text = f"{extra['help']} (default: {default})" if default not in (None, []) else extra["help"]
        kwargs: dict[str, Any] = {"dest": name, "type": arg_type, "help": help_text,
                                  "default": argparse.SUPPRESS, "metavar": name.upper()}
        if choices:
            kwargs["choices"] = choices
        if extra.get("repeatable"):
            kwargs["action"] = "append"
        parser.add_argument(extra["flag"], **kwargs)


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--root", type=Path, default=argparse.SUPPRESS,
                       help="workspace folder (default: the current folder)")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="print only warnings and errors on stderr")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug output, including llama.cpp's own log")
    group.add_argument("--full-help", action="store_true", default=argparse.SUPPRESS,
                       help="show this help and every command's help")
    model_group = common.add_argument_group("model and context")
    _add_option_flags(model_group, EngineOptions)
    sampling_group = common.add_argument_group("sampling (the REPL's inference_parameters use the same names)")
    _add_option_flags(sampling_group, SamplingOptions)
    server_group = common.add_argument_group("servers (instead of the local engine; docs/servers.md)")
    _add_option_flags(server_group, ServerOptions)
    return common


def version_text() -> str:
    from cached_prompts.local.engine import LLAMA_CPP_VERSION
    from cached_prompts.version import __version__

    return f"cached-prompts {__version__} (llama-cpp-python {LLAMA_CPP_VERSION})"


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for (it imports llama_cpp)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show the versions of cached-prompts and llama-cpp-python and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(prog="cached-prompts", description=DESCRIPTION, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command_parser = sub.add_parser(command.name, help=command.help.replace("%", "%%"),
                                        description=command.help, parents=[common])
        command.add_arguments(command_parser, common)
    return parser


def full_help(parser: argparse.ArgumentParser, prefix: str = "") -> str:
    """The parser's help, then every (nested) command's help."""
    parts = [parser.format_help()] if not prefix else []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, command in action.choices.items():
            title = f"{prefix}{name}"
            parts.append(f"\n{'=' * 20} {title} {'=' * 20}\n{command.format_help()}")
            parts.append(full_help(command, f"{title} "))
    return "".join(parts)


# ----- setup ---------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def setup_logging(quiet: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


OPTION_NAMES = {name for model in OPTION_MODELS for name in model.model_fields}


def resolve_options(args: argparse.Namespace, workspace: Workspace) -> tuple[EngineOptions, SamplingOptions]:
    """Defaults < cached-prompts.toml < command-line flags."""
    values = workspace.load_config()
    given = {k: v for k, v in vars(args).items() if k in OPTION_NAMES}
    values.update(given)
    return split_by_model(values, "options (command-line flags or cached-prompts.toml)")


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a reader that left (`| head`) is handled below
        return code
    except BrokenPipeError:
        if not _stdout_reader_left():
            raise  # another pipe or socket broke: a real error
        # The reader of stdout left (`| head`): stop quietly, as other command-line tools do.
        # stdout now points at /dev/null so that Python's flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "full_help", False):
        print(full_help(parser))
        return 0
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        return run_command(args)
    except CachedPromptsError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; finished outputs are kept, the rest will be made on the next run")
        return 130


def _stdout_reader_left() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll (Windows) or no real stdout
        return True


def run_command(args: argparse.Namespace) -> int:
    command = COMMANDS[args.command]
    if command.needs is Needs.ARGUMENTS:
        return command.run(Invocation(args))
    invocation = _in_workspace(args)
    if command.needs is Needs.WORKSPACE:
        return command.run(invocation)
    with invocation.open_backend() as backend:
        return command.run(dataclasses.replace(invocation, backend=backend))


def _in_workspace(args: argparse.Namespace) -> Invocation:
    """The workspace of --root (which must exist) and the options resolved in it."""
    workspace = Workspace(Path(getattr(args, "root", Path.cwd())).resolve())
    workspace.check_exists()
    engine_options, sampling = resolve_options(args, workspace)
    servers = server_options(workspace.load_config(), {k: v for k, v in vars(args).items() if k in OPTION_NAMES},
                             "options (command-line flags, $CACHED_PROMPTS_SERVER or cached-prompts.toml)")
    return Invocation(args, workspace.with_options(engine_options), engine_options, sampling, servers)


# ----- the commands of this module -----------------------------------------------------------


def _add_outputs_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=5, metavar="N", help="sampled answers per input (default: 5)")
    parser.add_argument("-f", "--force-outputs", action="store_true",
                        help="regenerate outputs even if they are up to date")
    parser.add_argument("--report", action="store_true", default=argparse.SUPPRESS,
                        help="refresh report.html at the end (also: report = true in cached-prompts.toml)")


def _add_test_prompts_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    _add_outputs_arguments(parser, common)
    parser.add_argument("-d", "--deterministic", action="store_true",
                        help="one greedy (temperature 0) answer per prompt instead")
    parser.add_argument("--check", action="store_true",
                        help="then check the outputs against their expectations, as `check` does "
                             "(exit status 1 if any prompt is under its threshold)")


def _add_json_argument(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def _add_repl_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-waiting", action="store_true",
                        help="decode single_prompt lines already waiting on stdin together (same "
                             "prelude and sampling); their outputs then depend on what was batched")


def _add_report_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="where to write the page (default: report.html at the workspace root)")
    parser.add_argument("--open", action="store_true", help="open the page in the web browser")


def _add_cache_actions(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    for name, action_help in cache_admin.ACTIONS.items():
        action = actions.add_parser(name, help=action_help, description=action_help, parents=[common])
        action.add_argument("--json", action="store_true", help="print the result as JSON")
        if name == "prune":
            action.add_argument("--max-size", metavar="SIZE", default=None,
                                help="size to prune to, e.g. 500M or 2G (default: --cache-max-size)")


def _run_precache(invocation: Invocation) -> int:
    report = commands.precache_preludes(invocation.workspace, invocation.backend)
    log.info("preludes: %d computed, %d already cached, %d skipped",
             len(report.written), len(report.up_to_date), len(report.skipped))
    return 1 if report.skipped else 0


def _run_outputs_for_drafts(invocation: Invocation) -> int:
    args = invocation.args
    _check_n(args.n)
    report = commands.outputs_for_drafts(invocation.workspace, invocation.backend, invocation.sampling, args.n,
                                         args.force_outputs)
    return _after_outputs(invocation, report)


def _run_outputs_test_prompts(invocation: Invocation) -> int:
    args = invocation.args
    _check_n(args.n)
    report = commands.outputs_test_prompts(invocation.workspace, invocation.backend, invocation.sampling, args.n,
                                           args.deterministic, args.force_outputs)
    return _after_outputs(invocation, report)


def _check_n(n: int) -> None:
    if n < 1:
        raise OptionsError(f"-n {n}: the number of answers must be at least 1")


def _after_outputs(invocation: Invocation, report: commands.RunReport) -> int:
    """Log what an outputs command did, refresh the report and check if asked; its exit status."""
    log.info("outputs: %d written; inputs: %d up to date, %d skipped",
             len(report.written), len(report.up_to_date), len(report.skipped))
    if invocation.engine_options.report:
        path = _refresh_report(invocation, invocation.sampling, report.skipped, run_id=report.run_id)
        log.info("report: %s", path)
    if getattr(invocation.args, "check", False) and method_cli.print_check(
            invocation.workspace, invocation.backend, invocation.sampling, as_json=False):
        return 1
    return 1 if report.skipped else 0


def _run_token_stats(invocation: Invocation) -> int:
    stats = token_stats.token_stats(invocation.workspace, invocation.backend)
    print(token_stats.render_json(stats) if invocation.args.json else token_stats.render_text(stats))
    return 0


def _run_repl(invocation: Invocation) -> int:
    from cached_prompts.repl.serve import serve

    return serve(invocation.engine_options, invocation.sampling, invocation.workspace, verbose=invocation.verbose,
                 server_options=invocation.servers, batch_waiting=invocation.args.batch_waiting)


def _run_report(invocation: Invocation) -> int:
    # No run's options to judge the recipes by: outputs are judged by time and model.
    path = _refresh_report(invocation, None, [])
    print(path)
    if invocation.args.open:
        import webbrowser

        webbrowser.open(path.as_uri())
    return 0


def _refresh_report(invocation: Invocation, sampling: SamplingOptions | None, skipped: list[tuple[Path, str]],
                    run_id: str | None = None) -> Path:
    from cached_prompts.report import page as report_page

    output = getattr(invocation.args, "output", None)
    return report_page.refresh_report(invocation.workspace, invocation.backend, output.resolve() if output else None,
                                      sampling=sampling, run_id=run_id, skipped=skipped)


def _run_cache(invocation: Invocation) -> int:
    args = invocation.args
    print(cache_admin.run(args.cache_action, invocation.workspace.cache_dir, invocation.engine_options,
                          max_size=getattr(args, "max_size", None), as_json=args.json))
    return 0


# Every command, in the order of the help; the parser and the dispatch are built from it.
COMMANDS: dict[str, Command] = table(
    Command("precache-preludes", "compute and store the state of every prelude in preludes/", _run_precache,
            needs=Needs.BACKEND),
    Command("outputs-for-drafts", "write N sampled answers per draft to prelude_drafts_outputs/",
            _run_outputs_for_drafts, needs=Needs.BACKEND, add_arguments=_add_outputs_arguments),
    Command("outputs-test-prompts", "write answers per test prompt to test_prompts_outputs/",
            _run_outputs_test_prompts, needs=Needs.BACKEND, add_arguments=_add_test_prompts_arguments),
    Command("show-stats-on-tokens-number", "show how many tokens every file and combination takes",
            _run_token_stats, needs=Needs.BACKEND, add_arguments=_add_json_argument),
    Command("stdio-json-repl", "serve JSON requests on stdin, one response line per request on stdout",
            _run_repl, add_arguments=_add_repl_arguments),
    Command("report", "write report.html: every prompt with its outputs side by side, in one page", _run_report,
            needs=Needs.BACKEND, add_arguments=_add_report_arguments),
    *method_cli.COMMANDS,
    *watch_cli.COMMANDS,
    Command("cache", "manage the prelude cache in llm_cache/ (list, size, prune, clear)", _run_cache,
            add_arguments=_add_cache_actions),
)


if __name__ == "__main__":
    sys.exit(main())
