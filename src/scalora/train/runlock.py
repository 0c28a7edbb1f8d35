"""One writer per run folder: an exclusive lock on ``<output_dir>/.lock`` that names its owner.

The lock is an ``fcntl.flock`` on that file. The kernel drops it when the owning process ends, however it ends,
so the lock of a killed run is simply taken over by the next one; the file holds the owner's pid for the message
that a second run gets. The owner removes the file while still holding the lock, and a process that locked a file
that was meanwhile removed tries again on the new one, so two processes never both hold the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from scalora.errors import ScaloraError

LOCK_NAME = ".lock"


class RunLockedError(ScaloraError):
    """Another live process is writing the run folder."""


class RunLock:
    """Holds `folder` between `acquire` and `release` (creating it if missing, and removing it again if it is left
    empty).

    `previous_owner` is the pid written by an earlier owner that ended without releasing the lock (killed), or None.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self.previous_owner: int | None = None
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the lock; `RunLockedError` names the owner if a live process holds it (OSError: no folder)."""
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                for _ in range(20):  # the owner writes its pid right after it locks: give it a moment
                    if owner is not None:
                        break
                    time.sleep(0.01)
                    owner = _read_pid(fd)
                os.close(fd)
                self._remove_if_created()
                raise RunLockedError(
                    f"{self.folder} is in use by another run (process {owner if owner is not None else 'unknown'}); "
                    f"wait for it to finish or stop it, or choose another --output-dir."
                ) from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the previous owner removed the file between our open and our lock: lock the current one
                os.close(fd)
        try:
            self.previous_owner = _read_pid(self._fd)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n{time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
        except BaseException:  # e.g. a full disk: leave no lock behind
            self.release()
            raise

    def release(self) -> None:
        """Give the lock up (the lock file goes with it)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: nobody can hold the file we remove
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A folder this lock created and nothing else filled (the run failed before writing) is removed."""
        if self._created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, or another run holds it now
                self.folder.rmdir()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode(errors="replace").split("\n", 1)[0].strip()
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
