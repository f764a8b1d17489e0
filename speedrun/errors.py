"""The error boundary of every command (``speedrun …`` and ``leaderboard.py …``).

A command's expected failures — bad input, a file that cannot be read or written, a configuration that
does not fit — end as one line on stderr, ``error: <what> (<where>)``, and exit code 1 (2 for a usage
error, as argparse gives; 130 for Ctrl-C). An unexpected exception is a bug and keeps its traceback.
``--debug`` (or SPEEDRUN_DEBUG=1) shows the traceback of every failure.

Expected failures are:
- ``UserError`` (and its subclasses, e.g. speedrun.data.shards.ShardError): raised where the input is
  checked, naming the input;
- ``OSError``: the operating system refused a file operation (its file name is the "where");
- ``SystemExit`` with a message (the older style of the command-line checks);
- ``KeyboardInterrupt``.
"""

from __future__ import annotations

import os
import sys
import traceback


class UserError(ValueError):
    """Something the user gave is wrong: ``what`` is wrong, ``where`` (a file, an option) names it."""

    def __init__(self, what: str, where=None):
        self.what, self.where = what, where
        super().__init__(f"{what} ({where})" if where is not None else what)


def wants_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """(--debug given or SPEEDRUN_DEBUG set, argv without a leading --debug)."""
    debug = os.environ.get("SPEEDRUN_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        return True, argv[1:]
    return debug, argv


def describe_os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{what} ({where})" if where else what


def run_command(command, debug: bool) -> int:
    """``command()`` inside the boundary (see the module docstring); its exit code."""
    try:
        return command()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except SystemExit as e:
        if not isinstance(e.code, str):  # argparse's usage errors (2) and plain exit codes pass through
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {e.code.removeprefix('error: ')}", file=sys.stderr)
        return 1
    except (UserError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {describe_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 1
