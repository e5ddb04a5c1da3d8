"""Helpers for running sweeper against local emulators: used by its tests, demo and benchmarks,
and usable in your own CI."""
