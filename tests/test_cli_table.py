"""The command table of the command line (cli/main.py's COMMANDS): the parser offers exactly
its commands, in its order, and a command runs with what its entry says it needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cached_prompts.cli.command import Command, Needs, table
from cached_prompts.cli.main import COMMANDS, build_parser, full_help, main


def test_the_parser_offers_the_commands_of_the_table_in_its_order() -> None:
    sections = re.findall(r"^={20} (\S+) ={20}$", full_help(build_parser()), flags=re.MULTILINE)
    assert sections == list(COMMANDS)


def test_a_command_declared_twice_is_refused() -> None:
    entry = Command("twice", "help", lambda invocation: 0)
    with pytest.raises(ValueError, match="'twice' is declared twice"):
        table(entry, entry)


@pytest.mark.parametrize("name", [name for name, command in COMMANDS.items() if command.needs is not Needs.ARGUMENTS])
def test_every_command_that_needs_a_workspace_stops_where_there_is_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    extra = {"promote": ["d", "1"], "pick": ["d"], "cache": ["list"]}.get(name, [])
    code = main(["--root", str(tmp_path / "none"), name, *extra])
    assert code == 1
    assert "none" in capsys.readouterr().err


def test_init_needs_no_workspace(tmp_path: Path) -> None:
    assert COMMANDS["init"].needs is Needs.ARGUMENTS
    assert main(["init", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "cached-prompts.toml").is_file()
