"""One writer per run folder: an advisory lock on ``<folder>/.lock`` that a run takes before any stage writes.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when its process ends, however it ends: a
lock file left by a process that is gone is simply taken over. The file holds the holder's PID, for the message
another command gets. Within one process the lock is taken once per folder and held until the process exits, so
the same program may open a folder as often as it likes (a rerun in a test, a Tune driver); it guards against
other processes only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

_HELD: dict[Path, int] = {}  # folder -> the open file descriptor holding its lock, in this process


class FolderBusy(ValueError):
    """Another process holds the run folder's lock."""


def lock_folder(folder: str | Path) -> None:
    """Take ``folder``'s lock for this process (creating the folder), or raise :class:`FolderBusy` at once, naming
    the folder and the PID that holds it."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderBusy(f"run folder {folder} is in use by another diffinject process (pid {holder}); wait for it "
                         "to finish, or use another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[folder] = fd


def release_folder(folder: str | Path) -> None:
    """Give ``folder``'s lock back, if this process holds it: a long-lived process (a Ray worker running one run
    after another) lets other processes open the folder once its run is over."""
    fd = _HELD.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)
