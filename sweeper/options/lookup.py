"""What the commands take from the table: their click options in ``--help`` order, the check
of their variables, the settings their values make, and the keys a ``--config`` file knows."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import click

from sweeper.options.option import F, Option
from sweeper.options.table import OPTIONS


def options_of(command: str) -> tuple[Option, ...]:
    """The options ``command`` takes, in the order its ``--help`` lists them."""
    taken = [o for o in OPTIONS if command in o.help]
    ordered = [o for o in taken if command not in o.follows]
    for moved in (o for o in taken if command in o.follows):
        (anchor,) = [o for o in ordered if o.flag == moved.follows[command]]
        ordered.insert(ordered.index(anchor) + 1, moved)
    return tuple(ordered)


def command_options(command: str) -> Callable[[F], F]:
    """Decorate ``command``'s function with its click options, in ``--help`` order."""

    def apply(fn: F) -> F:
        for option in reversed(options_of(command)):
            fn = option.click_option(command)(fn)
        return fn

    return apply


class OptionsCommand(click.Command):
    """A command whose options come from :data:`OPTIONS`: it also checks their variables.

    The check runs once the arguments are parsed (which touches nothing, and lets ``--help``
    answer first) and before the command's function: no Datastore call precedes it.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.resilient_parsing:  # shell completion: nothing will run
            return super().parse_args(ctx, args)
        try:
            rest = super().parse_args(ctx, args)
        except click.UsageError:
            # A blank variable may be why parsing failed (" " is no number): name it instead.
            check_environment(str(self.name))
            raise
        check_environment(str(self.name))
        return rest


def check_environment(command: str) -> None:
    """Refuse a ``SWEEPER_*`` variable of ``command``'s options that is set but blank.

    click reads an empty variable as unset and falls back to the default, so ``SWEEPER_KIND=``
    (a value a manifest or a template lost) would sweep the default kind. Blank is never a
    value, whether or not the command line gives the option too. Only an option's own variable
    is checked: its fallbacks (``DATASTORE_PROJECT_ID``, ``GOOGLE_CLOUD_PROJECT``) belong to
    the Google client's conventions, where empty means unset.
    """
    blank = [o.envvar for o in options_of(command) if _is_blank(os.environ.get(o.envvar))]
    if len(blank) == 1:
        raise click.UsageError(f"{blank[0]} is set but empty: unset it or give a value")
    if blank:
        raise click.UsageError(
            f"{', '.join(blank)} are set but empty: unset them or give them values"
        )


def _is_blank(value: str | None) -> bool:
    """Set, but to nothing a value could be read from."""
    return value is not None and not value.strip()


def settings_fields(command: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`SweepSettings` fields that ``command``'s parsed options set."""
    return {
        o.sets: o.to_setting(values[o.param]) for o in options_of(command) if o.sets is not None
    }


def file_options() -> tuple[Option, ...]:
    """The options a ``--config`` target may set, in the order their keys are listed."""
    keyed = [o for o in OPTIONS if o.toml is not None]
    return tuple(sorted(keyed, key=lambda o: len(OPTIONS) if o.key_order is None else o.key_order))


def run_wide_options() -> tuple[Option, ...]:
    """The options a ``--config`` file is told apply to the whole run."""
    return tuple(o for o in OPTIONS if o.run_wide)
