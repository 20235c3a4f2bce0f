"""How the scripts end: a user's mistake is one line on stderr and exit status 2, no traceback.

Scripts raise UserError (or configurator.ConfigError) for anything the person at the keyboard can
fix, with a message naming the problem and the fix. Everything else is a bug and stays loud.
"""
import os
import shutil
import sys

from configurator import ConfigError


class UserError(Exception):
    """A problem with the user's input, files or machine, worded for the user."""


def run(main):
    """Call main(); turn user errors into one line and exit status 2."""
    script = os.path.basename(sys.argv[0]) or "python"
    try:
        main()
    except (UserError, ConfigError) as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        sys.exit(130)


def space_left(path):
    """'N MB free there': the free space on the filesystem of path (or of its nearest existing
    parent), for the message about a failed write."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
    except OSError:
        return "free space unknown"


def write_atomically(path, write):
    """Call write(temp_path), then rename the temp file over path, so a crash or a kill leaves the
    old file or the new one, never half of one. The temp file is removed if write fails."""
    folder = os.path.dirname(os.path.abspath(path))
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(temp_path)
        with open(temp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def replace_marked_section(path, name, text):
    """Put text between the lines <!-- name:begin --> and <!-- name:end --> of a file (a README),
    atomically. False, and nothing written, if the file or its markers are missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    new_content = f"{head}{begin}\n{text}{end}{tail}"

    def write(temp_path):
        with open(temp_path, "w", encoding="utf-8") as f:
            f.write(new_content)
    write_atomically(path, write)
    return True
