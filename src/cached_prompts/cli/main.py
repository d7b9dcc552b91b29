"""Command-line interface: parse, call the library, render. Nothing else lives here."""

from __future__ import annotations

import argparse
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
from cached_prompts.commands import cache_admin, token_stats
from cached_prompts.commands import outputs as commands
from cached_prompts.backend.interface import Backend
from cached_prompts.commands.choose_backend import open_backend
from cached_prompts.errors import CachedPromptsError, OptionsError
from cached_prompts.options import OPTION_MODELS, EngineOptions, SamplingOptions, ServerOptions, server_options, split_by_model
from cached_prompts.workspace.layout import Workspace

log = logging.getLogger("cached_prompts")

DESCRIPTION = """\
A workbench for prompts run through llama.cpp. Each prelude's model state is computed once,
kept in llm_cache/, and every later request starts from it. Work happens in a workspace
folder (--root, default: the current folder) with prelude_drafts/, preludes/, test_prompts/."""

COMMANDS = {
    "precache-preludes": "compute and store the state of every prelude in preludes/",
    "outputs-for-drafts": "write N sampled answers per draft to prelude_drafts_outputs/",
    "outputs-test-prompts": "write answers per test prompt to test_prompts_outputs/",
    "show-stats-on-tokens-number": "show how many tokens every file and combination takes",
    "stdio-json-repl": "serve JSON requests on stdin, one response line per request on stdout",
    "report": "write report.html: every prompt with its outputs side by side, in one page",
    **method_cli.COMMANDS,
    **watch_cli.COMMANDS,
}


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
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text, parents=[common])
        if name in ("outputs-for-drafts", "outputs-test-prompts"):
            command.add_argument("-n", type=int, default=5, metavar="N",
                                 help="sampled answers per input (default: 5)")
            command.add_argument("-f", "--force-outputs", action="store_true",
                                 help="regenerate outputs even if they are up to date")
            command.add_argument("--report", action="store_true", default=argparse.SUPPRESS,
                                 help="refresh report.html at the end (also: report = true in cached-prompts.toml)")
        if name == "outputs-test-prompts":
            command.add_argument("-d", "--deterministic", action="store_true",
                                 help="one greedy (temperature 0) answer per prompt instead")
            command.add_argument("--check", action="store_true",
                                 help="then check the outputs against their expectations, as `check` does "
                                      "(exit status 1 if any prompt is under its threshold)")
        if name == "show-stats-on-tokens-number":
            command.add_argument("--json", action="store_true", help="print the numbers as JSON")
        if name == "stdio-json-repl":
            command.add_argument("--batch-waiting", action="store_true",
                                 help="decode single_prompt lines already waiting on stdin together (same "
                                      "prelude and sampling); their outputs then depend on what was batched")
        method_cli.add_arguments(name, command)
        watch_cli.add_arguments(name, command)
        if name == "report":
            command.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                                 help="where to write the page (default: report.html at the workspace root)")
            command.add_argument("--open", action="store_true", help="open the page in the web browser")
    _add_cache_command(sub, common)
    return parser


def _add_cache_command(sub: Any, common: argparse.ArgumentParser) -> None:
    help_text = "manage the prelude cache in llm_cache/ (list, size, prune, clear)"
    cache = sub.add_parser("cache", help=help_text, description=help_text, parents=[common])
    actions = cache.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    for name, action_help in cache_admin.ACTIONS.items():
        action = actions.add_parser(name, help=action_help, description=action_help, parents=[common])
        action.add_argument("--json", action="store_true", help="print the result as JSON")
        if name == "prune":
            action.add_argument("--max-size", metavar="SIZE", default=None,
                                help="size to prune to, e.g. 500M or 2G (default: --cache-max-size)")


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
    if args.command == "init":
        return method_cli.run_init(args, getattr(args, "model_path", None))
    workspace = Workspace(Path(getattr(args, "root", Path.cwd())).resolve())
    workspace.check_exists()
    engine_options, sampling = resolve_options(args, workspace)
    workspace = workspace.with_options(engine_options)
    verbose = getattr(args, "verbose", False)
    servers = server_options(workspace.load_config(), {k: v for k, v in vars(args).items() if k in OPTION_NAMES},
                             "options (command-line flags, $CACHED_PROMPTS_SERVER or cached-prompts.toml)")
    if args.command == "cache":
        print(cache_admin.run(args.cache_action, workspace.cache_dir, engine_options,
                              max_size=getattr(args, "max_size", None), as_json=args.json))
        return 0
    if args.command == "stdio-json-repl":
        from cached_prompts.repl.serve import serve

        return serve(engine_options, sampling, workspace, verbose=verbose, server_options=servers,
                     batch_waiting=args.batch_waiting)
    if args.command in watch_cli.COMMANDS:
        return watch_cli.run(args, workspace, sampling, lambda: open_backend(engine_options, workspace, verbose=verbose,
                                                                              server_options=servers))
    if args.command in method_cli.COMMANDS:
        return method_cli.run(args, workspace, lambda: open_backend(engine_options, workspace, verbose=verbose,
                                                                    server_options=servers), sampling)
    with open_backend(engine_options, workspace, verbose=verbose, server_options=servers) as backend:
        return _dispatch(args, workspace, backend, sampling, refresh_report=engine_options.report)


def _dispatch(args: argparse.Namespace, workspace: Workspace, backend: Backend, sampling: SamplingOptions, *,
              refresh_report: bool = False) -> int:
    if args.command == "report":
        # No run's options to judge the recipes by: outputs are judged by time and model.
        _write_report(args, workspace, backend, None, [])
        return 0
    if args.command == "show-stats-on-tokens-number":
        stats = token_stats.token_stats(workspace, backend)
        print(token_stats.render_json(stats) if args.json else token_stats.render_text(stats))
        return 0
    if args.command == "precache-preludes":
        report = commands.precache_preludes(workspace, backend)
        log.info("preludes: %d computed, %d already cached, %d skipped",
                 len(report.written), len(report.up_to_date), len(report.skipped))
    else:
        if args.n < 1:
            raise OptionsError(f"-n {args.n}: the number of answers must be at least 1")
        if args.command == "outputs-for-drafts":
            report = commands.outputs_for_drafts(workspace, backend, sampling, args.n, args.force_outputs)
        else:
            report = commands.outputs_test_prompts(workspace, backend, sampling, args.n,
                                                   args.deterministic, args.force_outputs)
        log.info("outputs: %d written; inputs: %d up to date, %d skipped",
                 len(report.written), len(report.up_to_date), len(report.skipped))
        if refresh_report:
            _write_report(args, workspace, backend, sampling, report.skipped, run_id=report.run_id)
        if getattr(args, "check", False) and method_cli.print_check(workspace, backend, sampling, as_json=False):
            return 1
    return 1 if report.skipped else 0


def _write_report(args: argparse.Namespace, workspace: Workspace, backend: Backend, sampling: SamplingOptions | None,
                  skipped: list[tuple[Path, str]], run_id: str | None = None) -> None:
    from cached_prompts.report import page as report_page

    output = getattr(args, "output", None)
    path = report_page.refresh_report(workspace, backend, output.resolve() if output else None,
                                      sampling=sampling, run_id=run_id, skipped=skipped)
    if args.command == "report":
        print(path)
        if args.open:
            import webbrowser

            webbrowser.open(path.as_uri())
    else:
        log.info("report: %s", path)


if __name__ == "__main__":
    sys.exit(main())
