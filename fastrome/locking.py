"""One writer per folder: an advisory lock that the operating system drops when its holder exits,
however it exits (a killed run never leaves a stale lock behind)."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no locking, as before
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another writer (another process, or another object in this one) holds the folder."""


class FolderLock:
    """An exclusive lock on ``folder`` (the file ``folder/.lock``), held until :meth:`release`.

    Args:
        folder: the folder to lock (created if missing).
        what: how the error names the folder ("journal", "run directory", ...).
        wait: block until another process's hold ends instead of raising (a hold by this same
            process still raises: waiting on it would never end).
        on_wait: called once with the holder's description (" (process N)" or "") before blocking.
    Raises:
        FolderBusy: the folder is locked by another writer; the message names the folder and the
            holder's process id.
    """

    def __init__(
        self,
        folder: Union[str, "os.PathLike[str]"],
        what: str,
        *,
        wait: bool = False,
        on_wait: Optional[Callable[[str], None]] = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd: Optional[int] = None
        if fcntl is None:
            return
        path = self.folder / LOCK_NAME
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not self._try(fd):
                # a writer of this process that was dropped but not yet collected still holds it
                gc.collect()
                if not self._try(fd):
                    pid = _holder_pid(fd)
                    holder = _describe(pid)
                    if wait and pid != os.getpid():
                        if on_wait is not None:
                            on_wait(holder)
                        fcntl.flock(fd, fcntl.LOCK_EX)  # until the holder releases it or exits
                    else:
                        raise FolderBusy(
                            f"{what} {str(self.folder)!r} is in use by another writer{holder}: two runs "
                            "writing one folder would corrupt it; wait for the other to finish, or use another folder"
                        )
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    @property
    def held(self) -> bool:
        return self._fd is not None or fcntl is None

    def release(self) -> None:
        """Give the folder back (closing the file drops the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _holder_pid(fd: int) -> Optional[int]:
    """The process id the holder wrote into the lock file, or None when it cannot be read."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return None
    return int(pid) if pid.isdigit() else None


def _describe(pid: Optional[int]) -> str:
    if pid is None:
        return ""
    return f" (process {pid}{', this one' if pid == os.getpid() else ''})"
