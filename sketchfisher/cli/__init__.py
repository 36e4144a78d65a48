"""Command-line interface: ``sketchfisher <command> --help``. Exit codes: 0 ok, 1 failure, 2 usage.

:mod:`.parser` builds the arguments and runs a command, :mod:`.commands` holds the commands, and
:mod:`.inputs` what they share (the inputs a store recorded, optional extras)."""

from .inputs import _recompute_inputs  # noqa: F401 (the tests reach it here)
from .parser import build_parser, main

__all__ = ["build_parser", "main"]
