"""The command line of `watch`: its flags, the live server around the watcher, the address on
stderr. The work is the library's (commands/watch.py, report/live.py, report/live_server.py).
`COMMANDS` joins the command table of main.py."""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from cached_prompts.cli.command import Command, Invocation
from cached_prompts.commands.watch import WatchListener, WatchSettings, watch_workspace
from cached_prompts.errors import OptionsError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def _add_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=5, metavar="N", help="sampled answers per input (default: 5)")
    parser.add_argument("-d", "--deterministic", action="store_true",
                        help="one greedy (temperature 0) answer per test prompt instead (drafts: N sampled)")
    parser.add_argument("--port", type=int, default=0, metavar="PORT",
                        help="port of the live report (default: a free one, printed on stderr)")
    parser.add_argument("--host", default=LOOPBACK, metavar="HOST",
                        help="address the live report listens on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--open", action="store_true", help="open the live report in the web browser")
    parser.add_argument("--no-serve", action="store_true", help="no live report: only make what becomes stale")


def _run(invocation: Invocation) -> int:
    """Runs until Ctrl-C (KeyboardInterrupt goes to the caller, which exits with 130)."""
    args, workspace, sampling = invocation.args, invocation.workspace, invocation.sampling
    if args.n < 1:
        raise OptionsError(f"-n {args.n}: the number of answers must be at least 1")
    if not 0 <= args.port < 65536:
        raise OptionsError(f"--port {args.port}: a port is 0 (any free one) to 65535")
    settings = WatchSettings(n=args.n, deterministic=args.deterministic)
    with invocation.open_backend() as backend:
        if args.no_serve:
            print(f"watching {workspace.root}  (Ctrl-C stops watch)", file=sys.stderr, flush=True)
            watch_workspace(workspace, backend, sampling, settings, WatchListener(), threading.Event())
            return 0
        from cached_prompts.report.live import LiveReport
        from cached_prompts.report.live_server import LiveServer

        if args.host != LOOPBACK:
            log.warning("the live report listens on %s: whoever can reach this machine there can read this "
                        "workspace's prompts and outputs; use --host only on a network you trust", args.host)
        live = LiveReport(workspace, backend, sampling)  # on this thread, which alone may count tokens
        server = LiveServer(live, args.host, args.port)
        server.start()
        try:
            print(f"watching {workspace.root}, live report: {server.url}  (Ctrl-C stops watch)", file=sys.stderr,
                  flush=True)
            if args.open:
                import webbrowser

                webbrowser.open(server.url)
            watch_workspace(workspace, backend, sampling, settings, live, threading.Event())
        finally:
            server.stop()
    return 0


COMMANDS = (Command("watch", "make what is stale, then again whenever inputs change; serve a live report on 127.0.0.1",
                    _run, add_arguments=_add_arguments),)
