"""One command of the command line as the table in main.py holds it: its name and help, its
own flags, what it needs before it runs, and the function that runs it.

main.py declares the table once (with the entries of method.py and watch.py) and builds both
the parser and the dispatch from it, so a command is added in one place.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cached_prompts.backend.interface import Backend
from cached_prompts.commands.choose_backend import open_backend
from cached_prompts.options import EngineOptions, SamplingOptions, ServerOptions
from cached_prompts.workspace.layout import Workspace


class Needs(enum.Enum):
    """What is made ready before a command runs (each includes the ones above it)."""

    ARGUMENTS = "arguments"  # its arguments only (init, which makes the workspace)
    WORKSPACE = "workspace"  # an existing workspace and the options resolved in it
    BACKEND = "backend"  # and the backend, open for the whole command


@dataclass(frozen=True)
class Invocation:
    """What a command runs with. Fields past `args` are set as its `Needs` say: a command
    that needs only a workspace opens a backend itself (`open_backend`) once its own flags
    are checked, or not at all."""

    args: argparse.Namespace
    workspace: Workspace | None = None
    engine_options: EngineOptions | None = None
    sampling: SamplingOptions | None = None
    servers: ServerOptions | None = None
    backend: Backend | None = None

    @property
    def verbose(self) -> bool:
        return getattr(self.args, "verbose", False)

    def open_backend(self) -> Backend:
        """The backend of the resolved options; the caller closes it (`with`)."""
        return open_backend(self.engine_options, self.workspace, verbose=self.verbose,
                            server_options=self.servers)


def no_arguments(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """For a command with no flags of its own."""


# (the command's parser, the global options: parents of any parser the command adds below it)
AddArguments = Callable[[argparse.ArgumentParser, argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str  # the one-line help in the command list, also its description
    run: Callable[[Invocation], int]  # the exit status
    needs: Needs = Needs.WORKSPACE
    add_arguments: AddArguments = no_arguments


def table(*commands: Command) -> dict[str, Command]:
    """Commands by name, in the order given (the order of the help); a name given twice is a bug."""
    by_name: dict[str, Any] = {}
    for command in commands:
        if command.name in by_name:
            raise ValueError(f"the command {command.name!r} is declared twice")
        by_name[command.name] = command
    return by_name
