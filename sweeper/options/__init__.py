"""Every option of ``sweeper sweep`` and ``sweeper inspect``, each declared once in ``OPTIONS``.

One ``Option`` (``option.py``) says all there is about an option: its flag, the click type,
default and help of each command that takes it, the ``SweepSettings`` field it sets, and
whether (and how) a ``--config`` file may set it. The table (``table.py``) holds them all.
Built from it (``lookup.py``): both commands' click options (each also settable as
``SWEEPER_<NAME>``, shown in ``--help``), the settings a command's values make
(``settings_fields``), the clash check with ``--config`` (cli.py), the keys a config file
knows (config.py), and the refusal of a variable set but empty (``OptionsCommand``); and
(``reference.py``) the reference in docs/options.md, written by ``make cog``.
"""

# In dependency order: each module imports only those above it.
from sweeper.options.types import (  # noqa: I001
    DATABASE,
    DURATION,
    SHARD,
    DatabaseId,
    Duration,
    FiniteFloatRange,
    PushgatewayUrl,
    ShardType,
    TomlType,
)
from sweeper.options.option import COMMANDS, INSPECT, SWEEP, Option, every
from sweeper.options.table import OPTIONS
from sweeper.options.lookup import (
    OptionsCommand,
    check_environment,
    command_options,
    file_options,
    options_of,
    run_wide_options,
    settings_fields,
)
from sweeper.options.reference import config_reference, reference

__all__ = [
    "COMMANDS",
    "DATABASE",
    "DURATION",
    "INSPECT",
    "OPTIONS",
    "SHARD",
    "SWEEP",
    "DatabaseId",
    "Duration",
    "FiniteFloatRange",
    "Option",
    "OptionsCommand",
    "PushgatewayUrl",
    "ShardType",
    "TomlType",
    "check_environment",
    "command_options",
    "config_reference",
    "every",
    "file_options",
    "options_of",
    "reference",
    "run_wide_options",
    "settings_fields",
]
