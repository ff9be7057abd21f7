"""One writer per store: an exclusive lock object ``.actcache.lock`` at the store's root.

The lock holds ``{pid, host, since, token}``. ``kill -9`` leaves it behind, so a lock whose process
is gone *on this host* is stale and is taken over; so is an empty or unreadable lock once it is
older than a few seconds (a kill between creating the file and writing it), with a warning. Any
other holder refuses the second extract with a message naming its pid and host (a lock from
another host is never taken over: its process cannot be checked from here).

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


STALE_GRACE_S = 5.0  # an empty or unreadable lock younger than this may still be being written


class StoreLock:
    """Context manager holding ``<store>/<name>`` for the life of one extract."""

    def __init__(self, store: str | Path | StoreLocation, name: str = ".actcache.lock"):
        self.location = store if isinstance(store, StoreLocation) else StoreLocation(store)
        self.name = name
        self.path = self.location.local / name if self.location.is_local else f"{self.location}/{name}"
        self._held = False
        self._token: str | None = None

    def _read(self) -> str | None:
        try:
            return self.location.read_text(self.name)
        except (OSError, UnicodeDecodeError):
            return None

    def _holder(self) -> dict:
        """The lock's owner; {} when the lock is empty or unreadable."""
        try:
            d = json.loads(self._read() or "")
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}

    def _create(self, me: dict) -> bool:
        """Write the lock if nobody holds it; False if it exists."""
        try:
            self.location.write_text(self.name, json.dumps(me), create=True)
        except FileExistsError:
            return False
        # Object stores may lack a conditional create: the last writer wins, so check it was us.
        return self.location.is_local or self._holder().get("token") == me["token"]

    def _stale(self, holder: dict, host: str) -> str | None:
        """Why the lock can be taken over, or None while its owner may be alive."""
        pid = holder.get("pid")
        if holder.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
            return f"of dead process {pid}"
        if "pid" in holder and "host" in holder:
            return None
        # Empty or unreadable: a kill between creating the lock and writing it (or damage).
        age = self.location.age(self.name)
        if age is not None and age < STALE_GRACE_S:
            time.sleep(STALE_GRACE_S - age)  # a live writer fills its lock within milliseconds
            if self._holder():
                return None
        return "that is empty or unreadable (its writer was killed while creating it)"

    def acquire(self) -> None:
        if self.location.is_local:
            self.location.local.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "token": uuid.uuid4().hex}
        for _ in range(3):
            if self._create(me):
                self._held, self._token = True, me["token"]
                return
            before = self._read()
            holder = self._holder()
            why = self._stale(holder, me["host"])
            if why is None:
                holder = self._holder() or holder
                raise ActcacheError(
                    f"store {self.location} is being written by another extract (pid {holder.get('pid')} on "
                    f"{holder.get('host')}): wait for it to finish, or delete {self.path} if that process is gone"
                )
            if self._read() == before:  # nobody took it over meanwhile
                log.warning("taking over the stale lock %s %s", self.path, why)
                self.location.delete(self.name)
        raise ActcacheError(f"could not take the lock {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self._held:
            # The store may have been swapped or taken over meanwhile: remove only our own lock.
            if self._holder().get("token") == self._token:
                self.location.delete(self.name)
            self._held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
