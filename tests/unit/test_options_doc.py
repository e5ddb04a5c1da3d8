"""docs/options.md is generated from the code (``make cog``): it must be current and complete."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sweeper.cli import inspect, sweep
from sweeper.settings import KEYS, RUN_WIDE, flag

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "options.md"
TEXT = DOC.read_text()


def section(heading: str) -> str:
    """The text under ``## <heading>``, up to the next heading of that level."""
    return TEXT.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def rows(text: str) -> list[list[str]]:
    """The cells of each table row below the header (``\\|`` is a ``|`` inside a cell)."""
    table = [line for line in text.splitlines() if line.startswith("| ")]
    return [
        [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in table[1:]
    ]


def test_the_reference_is_what_cog_generates_from_the_code() -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "--diff", str(DOC)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, (
        f"docs/options.md is out of date: run `make cog`\n{checked.stdout}{checked.stderr}"
    )


COMMANDS = [(sweep, "`sweeper sweep`"), (inspect, "`sweeper inspect`")]


@pytest.mark.parametrize(("command", "heading"), COMMANDS, ids=["sweep", "inspect"])
def test_each_section_is_the_commands_help_listing_every_option(
    command: click.Command, heading: str
) -> None:
    text = section(heading)
    assert f"Usage: sweeper {command.name} [OPTIONS]" in text
    found = re.findall(r"^  (?:-[a-z], )?(--[a-z-]+)", text, flags=re.M)
    listed = [flag for flag in found if flag != "--help"]
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert listed == [p.opts[0] for p in options]


def test_every_config_key_is_documented_and_names_the_option_that_sets_its_field() -> None:
    keys = section("`--config` keys")
    documented = {cells[0].split()[0].strip("`"): cells for cells in rows(keys)}
    assert list(documented) == list(KEYS)
    by_name = {p.name: p for p in sweep.params if isinstance(p, click.Option)}
    for name, key in KEYS.items():
        assert documented[name][2] == f"`{flag(name)}`"
        # The option sets the key's field: its keyword is the field's name.
        assert flag(name) in by_name[key.field].opts, name
    for name in RUN_WIDE:
        assert f"`{name}`" in keys
        assert name in by_name
