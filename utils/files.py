"""Errors a user can fix, and safe files: atomic writes, the run lock, disk and memory checks, progress."""

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix; scripts print it as one line and exit."""


class BadImage(UserError):
    """A file that is not a whole, decodable image."""


class DiskFull(UserError):
    """A write that does not fit on the disk: the folder, and how much the step needed."""

    def __init__(self, folder, need, free=None):
        free = free_bytes(folder) if free is None else free
        super().__init__(
            f"the disk of {folder} is full: this step needs about {megabytes(need)} and {megabytes(free)} "
            "is free; free some space (or choose another folder) and run again"
        )


def megabytes(n):
    return f"{n / 1e3:,.0f} kB" if n < 1e6 else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def free_bytes(folder):
    """Free bytes on the filesystem that holds folder (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_space(folder, need):
    """Raise DiskFull unless folder's disk has room for need bytes plus a small margin."""
    free = free_bytes(folder)
    need += 64_000 + need // 20
    if free < need:
        raise DiskFull(folder, need, free)


def is_disk_full(error):
    """ENOSPC or EDQUOT, also when a library (h5py) reports it only in its message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "errno = 28" in text or "Disk quota exceeded" in text


def atomic_write(path, write, need=0, staged=False):
    """Call write(tmp_path) and rename the result onto path, so path is never half-written.

    need: bytes the file will take (0 if small or unknown), checked before writing. A disk that
    fills up while writing raises DiskFull, and the temporary file is removed.
    staged: write into memory (/dev/shm) first and copy from there: for writers that crash the
    interpreter when the disk fills under them (h5py), so only a plain copy meets the full disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need:
        check_space(path.parent, need)
    suffix = "".join(path.suffixes)  # keep ".weights.h5" whole: Keras checks file endings
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        if staged:
            ram = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            with tempfile.TemporaryDirectory(dir=ram) as stage:
                write(os.path.join(stage, path.name))
                shutil.copyfile(os.path.join(stage, path.name), tmp)
        else:
            write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        if not is_disk_full(e):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        os.remove(tmp)
        raise DiskFull(path.parent, max(need, written + free_bytes(path.parent))) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def exit_with(parent):
    """Run in a worker process: end it when process `parent` ends. A pool's workers wait for work on
    a pipe they hold both ends of, so a parent killed with SIGKILL would leave them waiting forever."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def exclusive(lock_file, what):
    """Hold lock_file for the duration of the block, or refuse when another process holds it.

    The kernel releases the lock when its process ends, however it ends, so a killed run never
    blocks the next one (nor do its worker processes, which do not inherit the lock). The file is
    removed at the end; a process that opened it just before
    sees that its file is no longer the one at lock_file and tries again.
    """
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock_file, "a+")
        try:
            # a POSIX record lock: unlike flock, worker processes forked later do not share it, so a
            # killed run's orphaned workers cannot keep it
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise UserError(f"{what} is in use by another run (process {pid}); wait for it to end or stop it") from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # removed by the run that just ended: lock the new file instead
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        os.unlink(lock_file)
        f.close()


def available_memory():
    """Bytes of memory a new allocation can get: MemAvailable, or a cgroup limit if lower."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def fail(message, code=2):
    """Print one line for a user mistake and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def quiet_stderr():
    """Park the stderr file descriptor: native start-up chatter (TensorFlow's CUDA probing and CPU
    notes, LiteRT's delegate notice) is written there before any log setting applies."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class Progress:
    """A one-line progress counter on stderr, for work that takes minutes."""

    def __init__(self, total, label):
        self.total, self.label, self.done, self.shown = total, label, 0, -1

    def update(self, n=1):
        self.done += n
        pct = 100 * self.done // max(self.total, 1)
        tty = sys.stderr.isatty()
        if pct != self.shown and (tty or pct % 10 == 0):  # logs get a line per 10%
            self.shown = pct
            end = "\n" if self.done >= self.total or not tty else ""
            print(f"\r{self.label}: {self.done}/{self.total} ({pct}%)", end=end, file=sys.stderr, flush=True)
