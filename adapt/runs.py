"""Run folders written as a whole, one writer at a time.

A run trains into ``<out>/<name>.partial`` and is renamed to ``<out>/<name>`` once its ``final.json`` is written,
so ``<out>/<name>`` is always a complete run (config.json, metrics.jsonl, heads.pt and final.json of one training)
or absent.  A complete run is replaced only when asked (``overwrite``): the new one is renamed into place and the
old one deleted after.  An exclusive lock (``flock`` on ``<out>/.<name>.lock``, held for the whole training and
released by the kernel when the process dies) makes a second writer of the same run stop in one line before it
reads anything; a sweep holds one more on its output folder (``<out>/.sweep.lock``, per rank under torchrun), so a
second sweep into the same folder stops before it trains anything.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from featstore.errors import UserError

PARTIAL, REPLACED = ".partial", ".replaced"


_LOCKS: dict = {}  # fd -> the lock file's path, removed when the lock is released


def hold_lock(path: Path, busy: str) -> int:
    """Take the exclusive ``flock`` on ``path`` (created if needed) without waiting; a held lock raises ``busy``
    as a UserError, a folder that cannot be written one line naming it.  Returns the file descriptor (the lock
    lasts until :func:`release_lock`, which removes the file, or until the process ends)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(busy) from None
            try:  # the file may have been removed by its last holder between our open and our lock: take anew
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except OSError as e:
        raise UserError(f"{path.parent}: cannot write there ({e.strerror or e}); give a folder you can write "
                        f"(--out)") from None
    _LOCKS[fd] = path
    return fd


def release_lock(fd: int | None) -> None:
    """Release a lock of :func:`hold_lock` and remove its file (no empty lock files pile up)."""
    if fd is not None:
        path = _LOCKS.pop(fd, None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RunFolder:
    def __init__(self, path: Path, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.work = self.path.with_name(self.path.name + PARTIAL)
        self._lock = None

    def claim(self) -> "RunFolder":
        """Lock the run, refuse a complete run unless overwriting, and start a fresh working folder."""
        try:
            self._claim()
        except OSError as e:
            self.release()
            raise UserError(f"{self.path.parent}: cannot write runs there ({e.strerror or e}); give another --out") \
                from None
        return self

    def abandon(self) -> None:
        """Remove the working folder of a run that stopped before its first evaluation (nothing in it to keep)."""
        if self.work.is_dir() and not (self.work / "metrics.jsonl").exists():
            shutil.rmtree(self.work, ignore_errors=True)

    def _claim(self) -> None:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        self._lock = hold_lock(self.path.parent / f".{self.path.name}.lock",
                               f"{self.path}: another process is training this run now (its lock is held); wait "
                               f"for it, or give this run another --out or --set tag=...")
        old = self.path.with_name(self.path.name + REPLACED)
        if old.exists() and not self.path.exists():
            old.rename(self.path)  # a replacement cut between its two renames: the old run is still whole
        elif old.exists():
            shutil.rmtree(old)
        if (self.path / "final.json").is_file() and not self.overwrite:
            self.release()
            raise UserError(f"{self.path}: a complete run is there; pass --overwrite to replace it (or give this "
                            f"run another --out or --set tag=...)")
        if self.work.exists():
            shutil.rmtree(self.work)  # left by a run that stopped before it finished
        self.work.mkdir(parents=True)

    def commit(self) -> None:
        """Put the finished run in place (the working folder holds its final.json)."""
        old = self.path.with_name(self.path.name + REPLACED)
        if self.path.exists():
            self.path.rename(old)
        self.work.rename(self.path)
        if old.exists():
            shutil.rmtree(old)

    def release(self) -> None:
        release_lock(self._lock)
        self._lock = None
