"""Writing files safely: atomic replacement, and a lock per output so two processes never write
the same cache, part folder or run folder."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import ADVICE, MachineFault, PipelineError


class LockError(PipelineError):
    pass


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yields a temporary path beside `path`; renamed onto `path` when the block ends without error,
    removed otherwise. Readers see the old file or the complete new one, never a partial one.
    `suffix` keeps an extension that a writer insists on (np.savez appends .npz otherwise)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:      # a failed write() names no file: the refusal should name the output
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def sha256(path, chunk=1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks (weights, head files, videos)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


_HELD: set[Path] = set()     # lock files this process holds


@contextmanager
def exclusive(path, what: str):
    """Holds an exclusive lock on `<path>.lock` for the block; a second holder is refused at once
    with the first one's pid, host and command. The kernel releases the lock when the process
    dies (flock), so a killed run never leaves a stale lock behind (only an empty file, taken over by
    the next run); a run that ends removes the file. Re-entering a lock this process holds is allowed."""
    lock = Path(f"{path}.lock")
    if lock.resolve() in _HELD:         # this process holds it already (the CLI takes it before slow setup)
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace") or "{}"
            os.close(fd)
            raise LockError(f"{path}: another process is writing this {what} ({_holder(holder)}); "
                            "wait for it to finish or stop it") from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)           # the holder before us removed this file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(),
                                      command=" ".join(sys.argv))).encode(), 0)
        _HELD.add(lock.resolve())
        try:
            yield
        finally:
            _HELD.discard(lock.resolve())
            lock.unlink(missing_ok=True)   # while still held: no lock file outlives its run
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}: {h['command']}"
    except (ValueError, KeyError):
        return "holder unknown"


def check_output(path, what: str, folder: bool = False, need_bytes: int = 0) -> None:
    """Before any work: `path` can be written as a `what` (a file, or a folder with `folder`), and
    its file system has `need_bytes` free. Refusals name the path and what to do (MachineFault)."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise MachineFault(f"{path}: {ADVICE[21]} (the {what})")
    if path.exists() and not path.is_dir() and folder:
        raise MachineFault(f"{path}: {ADVICE[20]} (the {what} is a folder)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing != path and not existing.is_dir():
        raise MachineFault(f"{existing}: {ADVICE[20]} (on the way to the {what} {path})")
    where = existing if existing.is_dir() else existing.parent     # a file is replaced within its folder
    if not os.access(where, os.W_OK | os.X_OK):
        code = 30 if _read_only(where) else 13
        raise MachineFault(f"{where}: {ADVICE[code]} (the {what} {path})")
    if need_bytes:
        free = shutil.disk_usage(where).free
        if free < need_bytes:
            raise MachineFault(f"{where}: the {what} {path} needs about {readable_size(need_bytes)} and {readable_size(free)} are "
                               "free: free space there or write elsewhere")


def readable_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
