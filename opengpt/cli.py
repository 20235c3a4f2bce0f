"""How the scripts end: a user's mistake is one line on stderr and exit status 2, no traceback.

Scripts raise UserError (or configurator.ConfigError) for anything the person at the keyboard can
fix, with a message naming the problem and the fix. Everything else is a bug and stays loud.
"""
import os
import sys

from configurator import ConfigError


class UserError(Exception):
    """A problem with the user's input, files or machine, worded for the user."""


def first_line(error):
    """An exception's message cut to its first line (at most 160 characters), for a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def run(main):
    """Call main(); turn user errors into one line and exit status 2, Ctrl-C into one line and 130."""
    script = os.path.basename(sys.argv[0]) or "python"
    try:
        main()
    except (UserError, ConfigError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # stdout's reader is gone (`| head`): stop quietly, as the shell's own tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no pipe
        sys.exit(1)
