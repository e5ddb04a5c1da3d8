"""One option: everything about it, for every command that takes it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import click

from sweeper.options.types import TomlType

F = TypeVar("F", bound=Callable[..., Any])

SWEEP = "sweep"
INSPECT = "inspect"
COMMANDS = (SWEEP, INSPECT)


class _Unset(Enum):
    UNSET = "unset"


_UNSET = _Unset.UNSET


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, eq=False)
class Option:
    """One option: everything about it, for every command that takes it.

    The table's order is ``sweep --help``'s, and every other command's too except where
    ``follows`` says otherwise. Its variable is ``SWEEPER_<KEY>`` (then ``envvars``).
    """

    flag: str  # "--kind"; a switch: "--verify/--no-verify"
    help: Mapping[str, str]  # each command that takes the option -> its help there
    # How click parses it. ``name``: the keyword the command gets when not the flag's
    # (--property: prop). No ``default``: click's own (none; off for a flag).
    name: str | None = None
    type: click.ParamType[Any, Any] | None = None
    default: Any = _UNSET
    show_default: bool = False
    metavar: str | None = None
    is_flag: bool = False
    envvars: tuple[str, ...] = ()  # read after SWEEPER_<KEY>
    follows: Mapping[str, str] = field(default_factory=dict)  # command -> the flag it follows
    # The SweepSettings field the option sets (None: none), and how from click's value.
    sets: str | None = None
    to_setting: Callable[[Any], Any] = _same
    # --config. A target may set the option when ``toml`` says what its key (``key``) holds.
    # Given explicitly on the command line (or by its variable) as well, it is then a usage
    # error; unless ``overrides``: then the command line's value wins for every target (logged
    # where it replaces the file's), but ``safe`` wins whichever side sets it. ``required``:
    # every target must name it, the command line's default does not count. ``key_order``:
    # where messages and docs list the key (None: after the others, in table order).
    toml: TomlType | None = None
    overrides: bool = False
    safe: object = None
    required: bool = False
    key_order: int | None = None
    # Not in a file, which is told it applies to the whole run (rather than "unknown key").
    run_wide: bool = False

    @property
    def primary(self) -> str:
        """The flag that turns the option on: ``--verify`` for ``--verify/--no-verify``."""
        return self.flag.split("/")[0]

    @property
    def key(self) -> str:
        """Its name without dashes: the ``--config`` key, and ``SWEEPER_<KEY>`` upper-cased."""
        return self.primary[2:].replace("-", "_")

    @property
    def param(self) -> str:
        """The name click passes the value under (and ``ctx.get_parameter_source`` takes)."""
        return self.name or self.key

    @property
    def envvar(self) -> str:
        return "SWEEPER_" + self.key.upper()

    @property
    def per_target(self) -> bool:
        """With ``--config`` it belongs in the file: the command line setting it is an error."""
        return self.toml is not None and not self.overrides

    def click_option(self, command: str) -> Callable[[F], F]:
        attrs: dict[str, Any] = {
            "envvar": [self.envvar, *self.envvars] if self.envvars else self.envvar,
            "show_envvar": True,
            "help": self.help[command],
        }
        if self.type is not None:
            attrs["type"] = self.type
        if self.default is not _UNSET:
            attrs["default"] = self.default
        if self.show_default:
            attrs["show_default"] = True
        if self.metavar is not None:
            attrs["metavar"] = self.metavar
        if self.is_flag:
            attrs["is_flag"] = True
        decls = (self.flag, self.name) if self.name else (self.flag,)
        return click.option(*decls, **attrs)


def every(text: str) -> dict[str, str]:
    """The same help in every command."""
    return dict.fromkeys(COMMANDS, text)
