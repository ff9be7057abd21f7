"""One writer per store: an exclusive lock object ``.actcache.lock`` at the store's root.

The lock holds ``{pid, host, since}``. ``kill -9`` leaves it behind, so a lock whose process is
gone *on this host* is stale and is taken over; any other holder refuses the second extract
with a message naming its pid and host (a lock from another host is never taken over: its
process cannot be checked from here).

Local stores create the file with ``O_CREAT | O_EXCL``, which is atomic. URL stores create
the object with fsspec's ``pipe_file(mode="create")`` (a conditional create where the backend
has one, otherwise check-then-write) and read it back: on object stores the lock is
advisory, guarding against the common mistake (a second extract, a resume while one runs),
not against two extracts started within the same instant on different hosts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from actcache.errors import ActcacheError
from actcache.urls import StoreLocation

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

    def __init__(self, store: str | Path | StoreLocation, name: str = ".actcache.lock"):
        self.location = store if isinstance(store, StoreLocation) else StoreLocation(store)
        self.name = name
        self.path = self.location.local / name if self.location.is_local else f"{self.location}/{name}"
        self._held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.location.read_text(self.name))
        except (OSError, ValueError):
            return {}

    def _create(self, me: dict) -> bool:
        """Write the lock if nobody holds it; False if it exists."""
        try:
            self.location.write_text(self.name, json.dumps(me), create=True)
        except FileExistsError:
            return False
        # Object stores may lack a conditional create: the last writer wins, so check it was us.
        return self.location.is_local or self._holder().get("token") == me["token"]

    def acquire(self) -> None:
        if self.location.is_local:
            self.location.local.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "token": uuid.uuid4().hex}
        for _ in range(2):
            if self._create(me):
                self._held = True
                return
            holder = self._holder()
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                log.warning("removing stale lock of dead process %s on %s", pid, self.path)
                self.location.delete(self.name)
                continue
            raise ActcacheError(
                f"store {self.location} is being written by another extract (pid {pid} on {host}): "
                f"wait for it to finish, or delete {self.path} if that process is gone"
            )
        raise ActcacheError(f"could not take the lock {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self._held:
            self.location.delete(self.name)
            self._held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
