"""One writer per folder: an exclusive advisory lock that the operating system releases when the
process ends, however it ends (kill -9 included), so a dead run never leaves a stale lock.

    with lock_folder("data/zh_default", "prepare.py"):
        ...  # no other process holding this lock can write the folder now

The lock is flock(2) on a small file *beside* the folder, `<parent>/.<name>.lock`, not inside it:
prepare.py replaces the folder whole, and a lock inside would go with it. The file holds the pid
of its holder, for the message a second process gets. It is left in place when released: removing
it would let a third process lock a new file while a second still waits on the old one.
"""
import contextlib
import fcntl
import os

from cli import UserError


def lock_path(folder):
    parent, name = os.path.split(os.path.realpath(folder))
    return os.path.join(parent, f".{name}.lock")


@contextlib.contextmanager
def lock_folder(folder, holder):
    """Hold the lock on `folder` (which need not exist yet) for the with-block, or raise a UserError
    naming the process that holds it. `holder` names the script, for that message."""
    path = lock_path(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise UserError(f"{folder} is being written by another {holder} (pid {other}); "
                            f"wait for it to finish, stop it, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock
