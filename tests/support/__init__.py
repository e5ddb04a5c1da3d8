"""Helpers for running sweeper against local emulators: emulator start/stop, a latency/cut TCP
proxy, runner-shaped seeding. Used by the tests, ``make demo`` (scripts/demo.py) and the
benchmarks (bench/); not part of the sweeper package."""
