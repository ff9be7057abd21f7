"""The loader's background producer: one thread that builds the next item while the current one
is consumed, bounded to two items alive, and never left blocked by a consumer that has gone."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

__all__ = ["PREFETCH_THREAD", "Prefetcher"]

PREFETCH_THREAD = "actcache-loader-prefetch"
_POLL_S = 0.05  # how often a blocked prefetch thread checks whether the consumer has gone
_END = object()  # end of the item stream


class Prefetcher:
    """Items (the loader's groups) for the consumer: built by a background thread (at most two
    alive: the consumer's and the next) or, without prefetch, on demand on the consumer's thread.

    ``make(starving, stopped)`` returns the item iterator; ``starving()`` says the consumer is
    blocked on an item not yet queued (so building it should not yield to anything), ``stopped()``
    that the consumer has gone. ``release()`` gives back a slot once an item is consumed."""

    def __init__(self, make: Callable[[Callable[[], bool], Callable[[], bool]], Iterator[Any]], prefetch: bool):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._slots = threading.Semaphore(2)  # taken before building a group, given back when it is consumed
        self._stop = threading.Event()
        self._waiting = threading.Event()  # the consumer is blocked on the next group
        self._thread = threading.Thread(target=self._run, name=PREFETCH_THREAD, daemon=True) if prefetch else None
        self._groups = make(self._starving, self._stop.is_set)
        if self._thread:
            self._thread.start()

    def _starving(self) -> bool:
        """The consumer waits for a group not yet queued (without prefetch: always)."""
        return self._thread is None or (self._waiting.is_set() and self._queue.empty())

    def _run(self) -> None:
        try:
            while self._acquire():
                item = next(self._groups, _END)
                if not self._put(item) or item is _END:
                    return
        except BaseException as err:  # re-raised by the consumer
            self._put(err)

    # Blocking calls poll the stop flag so an abandoned consumer never leaves the thread stuck.
    def _acquire(self) -> bool:
        while not self._stop.is_set():
            if self._slots.acquire(timeout=_POLL_S):
                return True
        return False

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def get(self) -> Any | None:
        if self._thread is None:
            return next(self._groups, None)
        self._waiting.set()
        try:
            item = self._queue.get()
        finally:
            self._waiting.clear()
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    def release(self) -> None:
        if self._thread is not None:
            self._slots.release()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._groups.close()
