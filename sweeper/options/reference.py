"""docs/options.md, generated from the table by ``make cog``."""

from __future__ import annotations

import json

import click

from sweeper.options.lookup import file_options, run_wide_options
from sweeper.options.types import describe_range


def reference(command: click.Command) -> str:
    """``command``'s options as a markdown table: flag, variables, default, help."""
    ctx = click.Context(command, info_name=command.name)
    rows = ["| option | env var | default | description |", "|---|---|---|---|"]
    for param in command.params:
        record = param.get_help_record(ctx)
        if not isinstance(param, click.Option) or record is None:
            continue
        envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
        description = param.help or ""
        if isinstance(param.type, click.IntRange | click.FloatRange):
            description += f" Range: `{describe_range(param.type)}`."
        rows.append(
            _row(
                f"`{record[0]}`",
                ", ".join(f"`{v}`" for v in envvars if v),
                _default(param),
                description,
            )
        )
    return "\n".join(rows) + "\n"


def config_reference() -> str:
    """The keys of a ``--config`` file as a markdown table, then those it refuses."""
    rows = [
        "| key | holds | option | the option given on the command line (or its variable) too |",
        "|---|---|---|---|",
    ]
    for option in file_options():
        key = f"`{option.key}`" + (" (required in every target)" if option.required else "")
        if option.overrides:
            rule = "wins over every target's value, logged as `option_overridden`"
            if option.safe is not None:
                rule += f"; but `{json.dumps(option.safe)}` wins, whoever sets it"
        else:
            rule = "a usage error"
        holds = option.toml.doc if option.toml else ""
        rows.append(_row(key, holds, f"`{option.primary}`", rule))
    run_wide = " and ".join(f"`{o.key}`" for o in run_wide_options())
    return (
        "\n".join(rows)
        + f"\n\n{run_wide} apply to the whole run: a file that sets one is refused. The other "
        "options of `sweep` are not keys either; like those, they come from the command line "
        "or the environment and apply to every target.\n"
    )


def _default(param: click.Option) -> str:
    if param.is_flag and param.default is True:
        return "on"
    if param.show_default and param.default not in (None, ""):
        return f"`{param.default}`"
    if param.is_flag and not param.secondary_opts:
        return "off"
    return "—"  # none, or decided at run time: the description says


def _row(*cells: str) -> str:
    """A markdown table row; a ``|`` inside a cell (``[json|console]``) is escaped."""
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
