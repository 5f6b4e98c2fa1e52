"""The save lock ``path/.lock``: created with ``O_CREAT|O_EXCL``, holding the saver's pid, host,
start time and token, refreshed by a heartbeat; a lock whose holder died (a dead pid on this
host, or a heartbeat older than :data:`LOCK_STALE_S`) is taken over."""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from typing import Optional

LOCK = ".lock"


LOCK_STALE_S = 60.0


HEARTBEAT_S = 5.0


def _read_holder(filename: str) -> Optional[dict]:
    """The holder recorded in lock file ``filename`` (None if unreadable or being written)."""
    try:
        with open(filename) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class SaveLock:
    """``path/.lock``, created with ``O_CREAT|O_EXCL`` (atomic on local and parallel file
    systems), holding ``{"pid", "host", "since", "token"}``; a heartbeat thread refreshes its
    mtime every :data:`HEARTBEAT_S` while the save runs."""

    def __init__(self, path: str, token: str):
        self.path, self.file, self.token = path, os.path.join(path, LOCK), token
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _is_stale(self, holder: Optional[dict]) -> bool:
        try:
            age = time.time() - os.path.getmtime(self.file)
        except OSError:
            return False  # gone meanwhile: the next attempt creates it
        if age > LOCK_STALE_S:
            return True
        if holder and holder.get("host") == socket.gethostname() and \
                isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its process died on this host
            except OSError:
                pass  # alive (another user's process)
        return False

    def _break(self, holder: Optional[dict]) -> None:
        """Remove the stale lock ``holder``, unless another saver replaced it meanwhile."""
        aside = f"{self.file}.tmp-stale-{self.token}"
        try:
            os.rename(self.file, aside)
        except OSError:
            return
        if _read_holder(aside) != holder:  # not the one judged stale: put it back
            os.rename(aside, self.file)
            return
        os.remove(aside)

    def _is_a_lock(self) -> bool:
        """True if ``.lock`` is a regular file, False if it is gone; ValueError naming the path
        for anything else (tpmpi never makes anything else there, so it can neither judge nor
        take over a directory or a link)."""
        try:
            info = os.lstat(self.file)
        except FileNotFoundError:
            return False
        if stat.S_ISREG(info.st_mode):
            return True
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else \
            "a symbolic link" if stat.S_ISLNK(info.st_mode) else "a special file"
        raise ValueError(f"checkpoint {self.path!r}: {self.file} is {kind}, not a tpmpi save "
                         "lock (a regular file): tpmpi does not remove what it did not create; "
                         "remove it yourself if no save to this path is running")

    def acquire(self) -> None:
        """Take the lock or raise ValueError naming its holder."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._is_a_lock():
                    continue  # gone meanwhile: try again
                holder = _read_holder(self.file)
                if self._is_stale(holder):
                    self._break(holder)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since "
                       f"{holder.get('since')}") if holder else "a save that is starting"
                raise ValueError(
                    f"checkpoint {self.path!r} is being saved by another job ({who}); "
                    f"concurrent saves to one path are refused: wait for it, or remove "
                    f"{self.file} if no save is running") from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                os.remove(self.file)  # a lock nobody could read would block every later save
                raise OSError(exc.errno, exc.strerror, self.file) from None
            self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                          name="tpmpi-checkpoint-lock")
            self._beat.start()
            return
        raise ValueError(f"checkpoint {self.path!r}: could not take the lock {self.file}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.file)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if (_read_holder(self.file) or {}).get("token") == self.token:
            os.remove(self.file)
