"""One writer per folder: an exclusive advisory lock that the operating system releases when the
process ends, however it ends (kill -9 included), so a dead run never leaves a stale lock.

    with lock_folder("data/zh_default", "prepare.py"):
        ...  # no other process holding this lock can write the folder now

    lock = FolderLock(out_dir, "train.py", inside=True)  # held for a training run; lock.release()

The lock is flock(2) on a small file that holds the pid of its holder, for the message a second
process gets. prepare.py's is *beside* the folder, `<parent>/.<name>.lock`, not inside it:
prepare.py replaces the folder whole, and a lock inside would go with it; that file is left in
place when released. train.py never replaces its out_dir, so its lock is inside, `out_dir/.lock`,
and removed on release, leaving the run's folder as it was. Removing a lock file is safe because a
process that locked a file checks that it is still the one at the path (else it tries again).
A lock file is ours to write and remove only if this process created it or it holds at most a pid
(what a holder killed mid-run leaves); a file of that name with anything else in it may be someone
else's: it is locked as it is, never truncated, never removed.
Windows has no flock: there msvcrt locks one byte of the same file (also freed when a process
ends), and the file is never removed.
"""
import atexit
import contextlib
import errno
import os
import re

from opengpt.cli import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

INSIDE_NAME = ".lock"
_WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt locks are mandatory: lock a byte past the pid, which stays readable
_HELD_ELSEWHERE = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK)}


def lock_path(folder):
    parent, name = os.path.split(os.path.realpath(folder))
    return os.path.join(parent, f".{name}.lock")


class FolderLock:
    """This process's exclusive lock on `folder`, or a UserError naming the process that holds it.
    `holder` names the script, for that message. OSError when the lock file cannot be written (a
    read-only or full filesystem): the caller words that for its own option."""

    def __init__(self, folder, holder, inside=False):
        self.path = os.path.join(folder, INSIDE_NAME) if inside else lock_path(folder)
        self.fd = None
        while self.fd is None:
            fd, created = _open_or_create(self.path)
            try:
                _try_lock(fd)
            except OSError as e:
                other = _read_pid(fd) if e.errno in _HELD_ELSEWHERE else None
                os.close(fd)  # if we created it, another process locked it first: it is theirs now
                if other is None:
                    raise
                raise _busy(folder, holder, other) from None
            if _is_the_file_at(fd, self.path):
                self.fd = fd
            else:  # its holder removed it (releasing) between our open and our lock: lock the new one
                os.close(fd)
        self.ours = created or _holds_at_most_a_pid(self.fd)
        self.remove_on_release = inside and fcntl is not None and self.ours
        atexit.register(self.release)  # a UserError's exit too; a kill leaves a file nobody holds
        if not self.ours:
            return
        try:
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)  # reading it moved the offset
            os.write(self.fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:  # a full disk: the caller says so
            self.release()
            raise

    def release(self):
        if self.fd is None:
            return
        if self.remove_on_release:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # while still locked, so no one else holds the file we remove
        os.close(self.fd)  # closing the file releases the lock
        self.fd = None


def check_not_busy(folder, holder, inside=False):
    """The UserError FolderLock would raise if a process holds folder's lock now; creates and changes
    nothing (for a caller that refuses a folder before locking it: a busy one is told so instead)."""
    path = os.path.join(folder, INSIDE_NAME) if inside else lock_path(folder)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _try_lock(fd)  # released by the close below
    except OSError as e:
        if e.errno in _HELD_ELSEWHERE:
            raise _busy(folder, holder, _read_pid(fd)) from None
    finally:
        os.close(fd)


def _busy(folder, holder, pid):
    return UserError(f"{folder} is being written by another {holder} (pid {pid}); "
                     f"wait for it to finish, stop it, or choose another folder")


@contextlib.contextmanager
def lock_folder(folder, holder):
    """Hold the lock beside `folder` (which need not exist yet) for the with-block, or raise a
    UserError naming the process that holds it."""
    os.makedirs(os.path.dirname(lock_path(folder)), exist_ok=True)
    lock = FolderLock(folder, holder)
    try:
        yield
    finally:
        lock.release()


def _try_lock(fd):
    """Take the lock without waiting: OSError (EAGAIN, EACCES, ...) when another process has it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _open_or_create(path):
    """(fd, whether this call created the file): O_EXCL tells a file we made from one that was there."""
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True  # not inherited by child processes
        except FileExistsError:
            pass
        try:  # never through a link: whatever it points at is not ours
            return os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0)), False
        except FileNotFoundError:  # removed by its holder in between: try again
            pass


def _holds_at_most_a_pid(fd):
    """Whether the file is empty or holds a pid line and nothing else: a lock file a killed holder left."""
    os.lseek(fd, 0, os.SEEK_SET)
    return re.fullmatch(rb"([0-9]+\n)?", os.read(fd, 64)) is not None


def _is_the_file_at(fd, path):
    if fcntl is None:
        return True  # Windows cannot remove an open file: it is still the one at path
    try:
        ours, current = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino)


def _read_pid(fd):
    """The holder's pid as it wrote it; it writes none in a file that is not ours (see the module's docstring)."""
    with contextlib.suppress(OSError):
        os.lseek(fd, 0, os.SEEK_SET)
        content = os.read(fd, 64)
        if not content:
            return "unknown: it has just started"
        if re.fullmatch(rb"[0-9]+\n", content):
            return content.decode("ascii").strip()
    return "unknown"
