"""An advisory lock on a folder or file, so two processes never write the same workdir or evaluation state.

`Lock(lock_path, what)` takes an exclusive `fcntl.flock` on `lock_path` and records who holds it (host, pid, start
time) in that file for the error message of the next taker. The kernel drops a flock when its holder exits,
however it exits, so a crashed run never leaves a stale lock behind on a local filesystem: the stale-lock rule
is "a lock nobody holds is free", whatever the file says. Paths on object stores (`gs://...`) are not locked (log
line); use one workdir per run there.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from dreamvideo_jax.errors import WorkdirError

log = logging.getLogger(__name__)


class Lock:
    """Context manager (or `acquire` / `release`) holding an exclusive lock on `lock_path`.

    Raises:
        WorkdirError: naming `what`, the holder (host, pid, since when) and what to do, when another process
            holds the lock.
    """

    def __init__(self, lock_path: str, what: str):
        self.path, self.what = os.fspath(lock_path), what
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        if "://" in self.path:
            log.info("%s is on an object store: not locked (use one workdir per run)", self.what)
            return self
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
                   if holder else "holder unknown")
            raise WorkdirError(f"{self.what} is in use by another process ({who}; lock {self.path}); wait for it to "
                               "finish, stop it, or use another path") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
