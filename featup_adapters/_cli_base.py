"""What every part of the command line shares: the program name and the user-error type.

Below both ``cli`` and the modules of its commands (``_cli_pictures``), so neither imports the other
for these.
"""
from __future__ import annotations

__all__ = ["PROG", "CLIError"]

PROG = "featup-adapters"


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""
