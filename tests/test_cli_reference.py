"""docs/cli.md is generated from the parser (cli/reference.py): it must match the code, and it
must name every command, every flag and every config key."""

from __future__ import annotations

import argparse
from pathlib import Path

from cached_prompts.cli import reference
from cached_prompts.cli.main import build_parser
from cached_prompts.options import OPTION_MODELS

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def every_parser(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found += every_parser(command)
    return found


def test_docs_cli_md_matches_the_parser() -> None:
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert current == reference.render(), (
        f"docs/cli.md is out of date with the parser; run `{reference.UPDATE_COMMAND}` "
        "from the repository root to update it, and commit the result")


def test_the_reference_names_every_command_flag_and_config_key() -> None:
    text = reference.render()
    for parser in every_parser(build_parser()):
        path = parser.prog.removeprefix("cached-prompts").strip()
        if path:
            assert f"## `{path}`" in text, f"no section for the command {path!r}"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            names = action.option_strings or [action.metavar or action.dest.upper()]
            assert any(f"`{name}" in text or f"`[{name}]" in text or f", {name}" in text for name in names), f"{names} missing"
    for model in OPTION_MODELS:
        for name, info in model.model_fields.items():
            assert f"`{name}`" in text, f"config key {name!r} missing"
            extra = info.json_schema_extra or {}
            if "flag" in extra:
                assert f"| `{extra['flag']}" in text, f"flag {extra['flag']} missing"


def test_the_default_and_config_key_of_a_flag_come_from_the_options_model() -> None:
    rows = {line.split(" | ")[0] for line in reference.render().splitlines() if line.startswith("| `--")}
    assert "| `--lp-temp TEMPERATURE`" in rows
    line = next(l for l in reference.render().splitlines() if l.startswith("| `--lp-repack"))
    assert line.startswith("| `--lp-repack auto\\|on\\|off` | `auto` | `repack` |"), line


def test_check_mode_exit_codes(tmp_path: Path, capsys) -> None:
    target = tmp_path / "cli.md"
    assert reference.main(["--check", str(target)]) == 1  # missing
    assert reference.UPDATE_COMMAND in capsys.readouterr().err
    assert reference.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == reference.render()
    assert reference.main(["--check", str(target)]) == 0
    target.write_text(reference.render() + "edited by hand\n", encoding="utf-8")
    assert reference.main(["--check", str(target)]) == 1
