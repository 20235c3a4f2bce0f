"""Write a folder beside the old one and swap it in only when complete, so that an interrupted
writer (Ctrl-C, kill, a full disk, a crash) leaves the previous folder as it was, or nothing.

    with lock_folder(out, "prepare.py"):   # folder_lock.py: one writer at a time
        remove_stale_folders(out)
        with staged_folder(out) as stage:
            ...  # write files into stage; if this raises, stage is removed and out is untouched

All a writer makes sits in one hidden sibling on the same filesystem, .<name>.staging-<pid>: a
marker file naming its pid, the new folder (`new`, the stage) and, during the swap, the old one
(`old`). The swap is two renames (out -> old, new -> out) with Ctrl-C and SIGTERM held off between
them; then the sibling goes. Only a kill -9 can leave it behind, and remove_stale_folders, called
under the folder's lock, removes it, putting the old folder back first if out is missing. Nothing
else is ever removed or renamed: a sibling without the marker, or whose process is alive, is not ours.
"""
import contextlib
import glob
import os
import shutil
import signal

from opengpt.cli import UserError
from opengpt.folder_lock import lock_folder

MARKER = "staged_folder.pid"  # inside every staging folder: what makes it recognisably ours


def marker_text(pid):
    return f"opengpt staged folder of process {pid}\n"


@contextlib.contextmanager
def staged_folder(out, is_ours=None):
    """A new folder to write into, in a staging sibling of `out`; when the with-block completes, it
    replaces `out` whole. On any error or interruption it is removed, and `out` is left as it was.
    is_ours(name): whether a file in `out` may go with it; one that may not (someone put it there
    while the folder was written) leaves `out` as it was, with a UserError."""
    staging = make_staging(out)
    try:
        new = os.path.join(staging, "new")
        os.mkdir(new)
        yield new
        replace_folder(staging, out, is_ours)
    finally:
        remove_staging(staging, out)


def make_staging(out):
    parent, name = os.path.split(out)
    staging = os.path.join(parent, f".{name}.staging-{os.getpid()}")
    os.mkdir(staging)
    try:
        with open(os.path.join(staging, MARKER), "x", encoding="utf-8") as f:
            f.write(marker_text(os.getpid()))
    except BaseException:
        os.rmdir(staging)
        raise
    return staging


def replace_folder(staging, out, is_ours=None):
    """Put the complete folder staging/new in the place of `out`, the old one going to staging/old:
    two renames, with Ctrl-C and SIGTERM held off between them. A kill -9 between them leaves out
    missing and the old folder in staging, which the next writer puts back (remove_stale_folders).
    The old folder's files are checked once it is renamed (no one can add to `out` after that)."""
    new, old = os.path.join(staging, "new"), os.path.join(staging, "old")
    fsync_folder(new)
    with signals_held():
        if os.path.exists(out):
            os.rename(out, old)
            try:
                added = sorted(f for f in os.listdir(old) if not is_ours(f)) if is_ours else []
                if added:
                    raise UserError(f"{out} gained files while this run wrote its replacement ({', '.join(added[:3])}"
                                    f"{', ...' if len(added) > 3 else ''}); it is left as it was and this run's output "
                                    f"discarded: move them out of it and run again")
                os.rename(new, out)
            except (OSError, UserError):
                os.rename(old, out)
                raise
        else:
            os.rename(new, out)
    fsync_folder(os.path.dirname(out) or ".")


@contextlib.contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Defer Ctrl-C and SIGTERM to the end of the with-block, then deliver them. A signal mask would
    not do: it covers one thread, and the kernel hands the signal to another (torch starts several),
    after which Python still runs the handler in the main thread."""
    received = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def remove_staging(staging, out):
    """Remove a staging folder, first putting its old folder back where out is missing. The marker
    goes last, so a removal cut short leaves a folder the next writer still knows as its own."""
    old = os.path.join(staging, "old")
    if os.path.isdir(old) and not os.path.lexists(out):
        os.rename(old, out)
    for part in ("new", "old"):
        shutil.rmtree(os.path.join(staging, part), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(staging, MARKER))
        os.rmdir(staging)


def fsync_folder(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_folders(out):
    """Remove what writers killed with kill -9 left beside `out` (the caller holds the lock, so no
    live writer of `out` has a staging folder): only staging folders with our marker, of processes
    that are gone."""
    parent, name = os.path.split(out)
    prefix = os.path.join(parent, f".{name}.staging-")
    for staging in glob.glob(glob.escape(prefix) + "*"):
        pid = staging[len(prefix):]
        # one of this process's pid is an earlier process's: this one makes its own after this call
        if pid.isdigit() and is_ours(staging, int(pid)) and (int(pid) == os.getpid() or not is_alive(int(pid))):
            remove_staging(staging, out)


def is_ours(staging, pid):
    marker = os.path.join(staging, MARKER)
    if os.path.islink(staging) or os.path.islink(marker) or not os.path.isfile(marker):
        return False
    try:
        with open(marker, encoding="utf-8") as f:
            return f.read(200) == marker_text(pid)
    except (OSError, UnicodeDecodeError):
        return False


def is_alive(pid):
    """Whether process pid runs."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there; the folder's lock has to do
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replaceable_folder(out, argv, script, is_ours, example):
    """The real path of --out=out, a folder `script` may replace whole: new, or holding only files for
    which is_ours(name) is true; else one line saying why not (an empty --out= in argv, a looping
    link, a file, someone else's files, the filesystem's root)."""
    if any(arg.startswith("--out=") and not arg[len("--out="):].strip() for arg in argv):
        raise UserError(f"--out= is empty; give a folder (e.g. --out={example}), or leave --out out for data/<name>")
    path = os.path.realpath(out)  # a symlinked --out stays a link: the folder it points to is replaced
    if os.path.islink(path):
        raise UserError(f"--out={out} is a symbolic link that leads round in a loop; point it at a folder, or remove it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out={out} is a file, not a folder; choose a folder")
    above = os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UserError(f"cannot create --out={out}: {above} is a file, not a folder; choose another --out")
    if os.path.ismount(path) or path == os.getcwd():  # neither can be renamed away, or should be
        where = "a mount point" if os.path.ismount(path) else "the current folder"
        raise UserError(f"--out={out} is {where}, which {script} would replace whole; give a folder inside it, "
                        f"e.g. --out={os.path.join(out, os.path.basename(example))}")
    if os.path.isdir(path):
        foreign = sorted(f for f in os.listdir(path) if not is_ours(f))
        if foreign or path == os.path.dirname(path):
            raise UserError(f"--out={out} holds files {script} did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); {script} replaces the whole folder, so choose a new one")
    return path


@contextlib.contextmanager
def writing_folder(out, path, script):
    """Hold out's lock (folder_lock.py), remove what killed writers left beside it, and turn an OSError
    of the writing (a full disk, a read-only folder) into one line: reading errors are UserErrors already."""
    try:
        with lock_folder(out, script):
            remove_stale_folders(path)
            yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"cannot write {out}: {e.strerror or e}{where}; {out} is as it was before. "
                        f"Check its free space and permissions, or choose another --out") from None
