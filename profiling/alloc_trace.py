"""A deterministic measure of a CPU region's peak memory: the bytes held by torch's CPU allocator
plus numpy's, on one timeline.

RSS depends on what glibc keeps resident and on page faults (issue 14: one configuration read
227 MB in one run and 281 MB in the next); the allocators' own books do not. Two sources:

* torch: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
  torch's CPU allocator (workspaces inside an op included) with a timestamp.
* numpy: the trainer allocates some CPU buffers with numpy (``trainer.saes.pairs.empty`` /
  ``zeros``: the covariance buffer, the penalty's U-long vectors; ``fused_pairs``: the packed row
  pairs and their scratch pool). numpy reports its data allocations to ``tracemalloc``
  (domain 389047). A profile function (``sys.setprofile``), called at every Python call and
  return and every C call and return, and a trace function (``sys.settrace``) at every line of
  the Python functions called inside the region, read ``tracemalloc.get_traced_memory()`` and,
  when it moved, drops a ``record_function`` marker into the same profiler timeline, so both are summed
  at the same instants (to the Python line: a numpy array freed by ``del`` is gone before the
  next line's torch op allocates).

Not counted: allocations that bypass both allocators: numba's own arrays inside the fused pair
kernels (per-thread partial gradients, (threads + 1) x (B k + 2 d_sae) values, a few MiB) and
the top-k kernel (``trainer/saes/select.py``: 8 d_sae + 4 d_sae / 8 bytes per thread), MKL's and
oneDNN's GEMM packing buffers, the interpreter itself. ``tracemalloc`` also counts Python objects
allocated during the region (kilobytes in a training step).
"""

from __future__ import annotations

import sys
import tracemalloc
from dataclasses import dataclass
from typing import Any

import numpy as np

_MARK = "npmem:"
_THRESHOLD = 64 * 1024  # numpy/Python bytes that must move before a marker is written
_MAX_MARKS = 1 << 20


@dataclass(frozen=True)
class TracePeak:
    peak_bytes: int  # torch + numpy at the peak instant, above the start
    torch_bytes: int  # torch's share at that instant
    numpy_bytes: int  # numpy's (tracemalloc's) share at that instant
    torch_peak: int  # torch's own peak over the region
    numpy_peak: int  # tracemalloc's own peak over the region
    n_events: int  # allocation events seen
    at: str = ""  # the torch op allocating at the peak instant ("numpy" when numpy's bytes peaked)


class AllocationTrace:
    """``with AllocationTrace() as t: ...`` then ``t.result()``: the region's peak above its start."""

    def __init__(self) -> None:
        self._marks = np.zeros((_MAX_MARKS, 2), dtype=np.int64)  # allocated before tracemalloc starts
        self._n = 0
        self._last = 0
        self._prof: Any = None
        self._started_tracemalloc = False

    def __enter__(self) -> AllocationTrace:
        from torch.autograd.profiler import record_function
        from torch.profiler import ProfilerActivity, profile

        self._record = record_function
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        if not tracemalloc.is_tracing():
            tracemalloc.start(1)
            self._started_tracemalloc = True
        tracemalloc.clear_traces()  # numpy's bytes count from here
        tracemalloc.reset_peak()
        self._mark(0, 0)
        self._outer = sys.gettrace(), sys.getprofile()  # a debugger's or coverage's, put back on exit
        sys.setprofile(self._on_event)  # C calls and returns
        sys.settrace(self._on_trace)  # Python lines: a free by ``del`` or rebinding shows before the next line
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._outer[0])
        sys.setprofile(self._outer[1])
        self._mark(*tracemalloc.get_traced_memory())
        self._prof.__exit__(*exc)
        if self._started_tracemalloc:
            tracemalloc.stop()

    def _on_event(self, frame: Any, event: str, arg: Any) -> None:
        cur, peak = tracemalloc.get_traced_memory()
        if abs(cur - self._last) >= _THRESHOLD or peak - self._last >= _THRESHOLD:
            self._mark(cur, peak)

    def _on_trace(self, frame: Any, event: str, arg: Any) -> Any:
        self._on_event(frame, event, arg)
        return self._on_trace

    def _mark(self, cur: int, peak: int) -> None:
        if self._n >= _MAX_MARKS:
            return
        self._marks[self._n] = (cur, peak)
        with self._record(f"{_MARK}{self._n}"):
            pass
        self._n += 1
        self._last = cur
        tracemalloc.reset_peak()

    def result(self) -> TracePeak:
        """Walk the profiler's event tree: allocations and markers in time order, summed."""
        if self._n >= _MAX_MARKS:
            raise RuntimeError(f"more than {_MAX_MARKS} numpy markers: the region is too long to trace")
        events: list[tuple[int, int, int, str]] = []  # (time, kind, value, op): kind 0 alloc, 1 mark
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            tag = node.tag.name
            if tag == "Allocation":
                f = node.extra_fields
                if f.device.type == "cpu":
                    op = node.parent.name if node.parent is not None else ""
                    events.append((node.start_time_ns, 0, int(f.alloc_size), op))
            elif node.name.startswith(_MARK):
                events.append((node.start_time_ns, 1, int(node.name[len(_MARK):]), "numpy"))
        events.sort(key=lambda e: (e[0], e[1]))
        torch_now = np_now = 0
        best: tuple[int, int, int, str] = (0, 0, 0, "")
        torch_peak = n_alloc = 0
        for _, kind, value, op in events:
            if kind == 0:
                torch_now += value
                n_alloc += 1
                torch_peak = max(torch_peak, torch_now)
                here = (torch_now + np_now, torch_now, np_now, op)
            else:
                cur, peak = (int(v) for v in self._marks[value])
                here = (torch_now + max(cur, peak), torch_now, max(cur, peak), op)
                np_now = cur
            if here[0] > best[0]:
                best = here
        numpy_peak = int(self._marks[: self._n].max()) if self._n else 0
        return TracePeak(peak_bytes=best[0], torch_bytes=best[1], numpy_bytes=best[2], torch_peak=torch_peak,
                         numpy_peak=numpy_peak, n_events=n_alloc, at=best[3])
