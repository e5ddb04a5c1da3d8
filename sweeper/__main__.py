"""``python -m sweeper`` runs the same CLI as the ``sweeper`` console script."""

from __future__ import annotations

from sweeper.cli import console_main

if __name__ == "__main__":
    console_main()
