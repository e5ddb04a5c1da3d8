"""docs/options.md is generated from the code (``make cog``): it must be current and complete."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from sweeper.cli import inspect, sweep
from sweeper.options import file_options, run_wide_options

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


@pytest.mark.parametrize(
    ("command", "heading", "param"),
    [
        pytest.param(command, heading, param, id=f"{command.name}-{param.name}")
        for command, heading in COMMANDS
        for param in command.params
        if isinstance(param, click.Option)
    ],
)
def test_every_option_of_both_commands_is_documented(
    command: click.Command, heading: str, param: click.Option
) -> None:
    documented = {
        tuple(re.findall(r"--[a-z-]+", cells[0])): cells for cells in rows(section(heading))
    }
    flags = (*param.opts, *param.secondary_opts)
    assert flags in documented, f"{'/'.join(flags)} of `{command.name}` missing from {DOC.name}"
    cells = documented[flags]
    envvars = param.envvar if isinstance(param.envvar, list) else [param.envvar]
    assert cells[1] == ", ".join(f"`{name}`" for name in envvars)
    assert cells[3].startswith(param.help or "")


@pytest.mark.parametrize(("command", "heading"), COMMANDS, ids=["sweep", "inspect"])
def test_the_reference_lists_nothing_else_and_in_help_order(
    command: click.Command, heading: str
) -> None:
    documented = [re.findall(r"--[a-z-]+", cells[0]) for cells in rows(section(heading))]
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert documented == [[*p.opts, *p.secondary_opts] for p in options]


def test_every_config_key_is_documented() -> None:
    keys = section("`--config` keys")
    documented = {cells[0].split()[0].strip("`"): cells for cells in rows(keys)}
    assert list(documented) == [o.key for o in file_options()]
    for option in file_options():
        assert documented[option.key][2] == f"`{option.primary}`"
    for option in run_wide_options():
        assert f"`{option.key}`" in keys
