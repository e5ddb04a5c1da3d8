"""The README is part of the interface: it must list every option, variable and field."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import click
import pytest

from sweeper.cli import sweep
from sweeper.engine import SweepResult
from sweeper.settings import SweepSettings

README = (Path(__file__).parents[2] / "README.md").read_text()


def option_rows() -> dict[str, str]:
    rows = re.findall(r"^\| `(--[a-z-]+)` \| (.+?) \|", README, flags=re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize(
    "param", [p for p in sweep.params if isinstance(p, click.Option)], ids=lambda p: p.name
)
def test_every_option_is_documented_with_its_env_var(param: click.Option) -> None:
    name = max(param.opts, key=len)
    if name == "--help":
        return
    rows = option_rows()
    assert name in rows, f"{name} missing from the README's options table"
    envvars = param.envvar if isinstance(param.envvar, list) else [param.envvar]
    for envvar in envvars:
        assert f"`{envvar}`" in rows[name]


def test_the_quick_start_is_make_demo_and_make_test() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in quick_start.splitlines()[1:]]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_every_sweep_finished_field_is_documented() -> None:
    settings = SweepSettings(kind="k", prop="p", format="auto", grace=dt.timedelta(0))
    result = SweepResult(settings, dt.datetime.now(dt.UTC), "auto", error="x")
    section = README.split("`sweep_finished` fields:", 1)[1].split("\n\n", 2)[1]
    for field in result.summary():
        assert f"`{field}`" in section, f"{field} missing from the sweep_finished table"


@pytest.mark.parametrize("code", ["0", "1", "2", "130 / 143"])
def test_exit_codes_are_documented(code: str) -> None:
    assert re.search(rf"^\| {code} \|", README, flags=re.MULTILINE)
