"""Write a folder beside the old one and swap it in only when complete, so that an interrupted
writer (Ctrl-C, kill, a full disk, a crash) leaves the previous folder as it was, or nothing.

    with lock_folder(out, "prepare.py"):   # folder_lock.py: one writer at a time
        remove_stale_folders(out)
        with staged_folder(out) as stage:
            ...  # write files into stage; if this raises, stage is removed and out is untouched

The stage is a hidden sibling, .<name>.new-<pid>, on the same filesystem, so the swap is two
renames. Only a kill -9 can leave anything behind (the stage, or between the two renames the old
folder as .<name>.old-<pid>); remove_stale_folders cleans it up, putting the old folder back if
there is no other. Call it under the folder's lock, so that no live writer's stage is removed.
"""
import contextlib
import glob
import os
import shutil
import signal


@contextlib.contextmanager
def staged_folder(out):
    """A new hidden folder beside `out` to write into; when the with-block completes, it replaces
    `out` whole. On any error or interruption it is removed, and `out` is left as it was."""
    parent, name = os.path.split(out)
    stage = os.path.join(parent, f".{name}.new-{os.getpid()}")
    os.mkdir(stage)
    try:
        yield stage
        replace_folder(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_folder(new, out):
    """Put the complete folder `new` in the place of `out`: two renames, with Ctrl-C and SIGTERM held
    off between them. A kill -9 between them leaves the old folder as .<name>.old-<pid>, which the
    next run puts back (remove_stale_folders)."""
    parent, name = os.path.split(out)
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    fsync_folder(new)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if os.path.exists(out):
            os.rename(out, old)
            try:
                os.rename(new, out)
            except OSError:
                os.rename(old, out)
                raise
        else:
            os.rename(new, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    fsync_folder(parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_folder(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_folders(out):
    """What a run killed with kill -9 left beside `out` (we hold the lock: its owner is gone)."""
    parent, name = os.path.split(out)
    prefix = glob.escape(os.path.join(parent, f".{name}"))
    for old in glob.glob(prefix + ".old-*"):
        if os.path.exists(out):
            shutil.rmtree(old)
        else:  # killed between the two renames of replace_folder: the old folder comes back
            os.rename(old, out)
    for stage in glob.glob(prefix + ".new-*"):
        shutil.rmtree(stage)
