"""``python -m sweeper`` and the ``sweeper`` console script. The CLI is imported inside the
handler for Ctrl-C: its imports (the Google client, gRPC) take about half a second, and Ctrl-C
in them would print a ``KeyboardInterrupt`` traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from sweeper.cli import console_main  # noqa: PLC0415 - here for the handler above
    except KeyboardInterrupt:
        print("\nsweeper: stopped by SIGINT while starting; nothing was done", file=sys.stderr)
        sys.exit(130)
    console_main()


if __name__ == "__main__":
    main()
