"""Files on disk: written whole or not at all, on the disk before anyone reads them, the free space
left when a write fails, and data files that ship inside installed packages.

Every write that must survive a crash goes through fsync_file, so the rule "on the disk before it
becomes visible" is written once: write_atomically (a temp file renamed over the old one),
write_text (prepare.py's files, reports), and export.py's folder.
"""
import importlib.util
import os
import shutil


def fsync_file(path):
    """Return once path's bytes are on the disk, not only in the operating system's cache."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomically(path, write):
    """Call write(temp_path), then rename the temp file over path, so a crash or a kill leaves the
    old file or the new one, never half of one. The temp file is removed if write fails."""
    folder = os.path.dirname(os.path.abspath(path))
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(temp_path)
        fsync_file(temp_path)
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def write_text(path, text):
    """path holds text (UTF-8), on the disk, whole or not at all."""
    def write(temp_path):
        with open(temp_path, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(path, write)


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


def package_data_file(package, relative_path):
    """The path of a data file inside an installed package (its folder, found without importing
    it), or None when the package is not installed or lacks the file."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, relative_path)
        if os.path.isfile(path):
            return path
    return None
