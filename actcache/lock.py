"""One writer per store: an exclusive lock file inside the store directory.

``kill -9`` leaves the file behind, so a lock whose process is gone (same host) is stale
and is taken over; a live one refuses the second extract with a message naming its pid.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from actcache.errors import ActcacheError

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Context manager holding ``<store>/<name>`` for the life of one extract."""

    def __init__(self, store: str | Path, name: str = ".actcache.lock"):
        self.path = Path(store) / name
        self._held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                    log.warning("removing stale lock of dead process %s on %s", pid, self.path)
                    self.path.unlink(missing_ok=True)
                    continue
                raise ActcacheError(
                    f"store {self.path.parent} is being written by another extract (pid {pid} on {host}): "
                    f"wait for it to finish, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise ActcacheError(f"could not take the lock {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
