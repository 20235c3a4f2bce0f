"""How the scripts end: a user's mistake is one line on stderr and exit status 2, no traceback.

Scripts raise UserError (or configurator.ConfigError) for anything the person at the keyboard can
fix, with a message naming the problem and the fix. Everything else is a bug and stays loud, but
for a rank of a torchrun run whose peer died: its collective's error is one line too.
"""
import os
import sys

from configurator import ConfigError

PEER_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError")  # torch.distributed's, by name: no torch here
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")  # what gloo says


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
    except RuntimeError as e:  # torch.distributed's DistError types are RuntimeErrors
        how = lost_a_peer(e)
        if not how:
            raise
        print(f"{script}: error: another process of this run stopped ({how}); its latest checkpoint is as saved: "
              f"continue with the same command plus --init_from=resume", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # stdout's reader is gone (`| head`): stop quietly, as the shell's own tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no pipe
        sys.exit(1)


def lost_a_peer(error):
    """How a collective failed because another process of the torchrun run is gone, if it did; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    said = next((text for text in PEER_GONE if text in str(error)), None)
    return said or (first_line(error) if type(error).__name__ in PEER_ERRORS else None)
