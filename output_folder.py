"""Folders the scripts write into (train.py's out_dir, export.py's export folder, prepare.py's data
folder): created with a one-line error when they cannot be, and locked so that two processes never
write into one folder at once.

The lock is an advisory lock (flock) on FOLDER/.lock, a file holding the pid of the process that has
it. The operating system drops the lock when the process ends, however it ends, so a killed run
never leaves a stale lock: the next run takes it. A clean release also removes the file. Windows has
no flock; there msvcrt locks one byte of the same file, which Windows also frees when a process ends.
"""
import atexit
import errno
import os
import shutil
import sys

from cli import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

LOCK_NAME = ".lock"
_WINDOWS_LOCK_OFFSET = 1 << 20  # msvcrt locks are mandatory: lock a byte past the pid, so it stays readable
_HELD = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, getattr(errno, "EDEADLOCK", errno.EDEADLK))


def make(path, option):
    """Create the folder path (and its parents), or raise a UserError that names option (--out_dir)."""
    if not path:
        raise UserError(f"{option} is empty; name a folder, e.g. {option}=out")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{option}={path} is an existing file, not a folder; choose another name")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {option}={path}: {e.strerror or e}") from None


def space_left(path):
    """'N MB free' on the filesystem of path (or of its nearest existing parent), for error messages."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free there"
    except OSError:
        return "free space unknown"


class FolderLock:
    """This process's exclusive hold on a folder; release() at the end, or let the process end."""

    def __init__(self, folder, option):
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # read-only filesystem, no permission, no inode left
                raise UserError(f"cannot write in {option}={folder}: {e.strerror or e}") from None
            try:
                _try_lock(fd)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in _HELD:  # a filesystem without locks (some network mounts): go on, say so
                    print(f"note: cannot lock {self.path} ({e.strerror}); make sure no other run writes "
                          f"{option}={folder}", file=sys.stderr)
                    return
                raise UserError(f"{option}={folder} is in use by another process ({holder}); wait for it "
                                f"to finish or choose another {option}") from None
            if _still_the_lock_file(fd, self.path):
                self.fd = fd
                atexit.register(self.release)  # also on a UserError's exit; a kill leaves a file nobody holds
            else:  # its holder released it (and removed the file) between our open and our lock: retry
                os.close(fd)
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}, {os.path.basename(sys.argv[0]) or 'python'}\n".encode())
        except OSError as e:  # a full disk: nothing else would be written there either
            self.release()
            raise UserError(f"cannot write in {option}={folder}: {e.strerror or e} ({space_left(folder)})") from None

    def release(self):
        if self.fd is None:
            return
        if fcntl is not None:
            os.remove(self.path)  # while still held, so no one can lock the file we are removing
        os.close(self.fd)
        self.fd = None


def _try_lock(fd):
    """Take the lock without waiting; OSError (EAGAIN, EACCES...) when another process has it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _still_the_lock_file(fd, path):
    if fcntl is None:
        return True  # Windows cannot remove an open file, so it cannot have been replaced
    try:
        ours, current = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino)


def _read_holder(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 200).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown: it has just started"
