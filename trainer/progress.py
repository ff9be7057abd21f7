"""Rich progress bars for training runs (the CLI's view of ``Trainer.fit``'s progress callback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from actcache.cli_support import console
from trainer.config import RunConfig


class RichTrainProgress:
    """One bar per run; the runs trained together (``for_run``) share one display."""

    def __init__(self, label: str = "train", bar: Progress | None = None) -> None:
        self._bar = bar or Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=16),
                                    TextColumn("{task.completed:,.0f}/{task.total:,.0f}"), TextColumn("{task.fields[info]}"),
                                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self._label, self._task = label, None

    def for_run(self, cfg: RunConfig) -> "RichTrainProgress":
        return RichTrainProgress(Path(cfg.train.out).name or "train", self._bar)

    def start(self, total_steps: int, done_steps: int, batch_size: int) -> None:
        self._bar.start()  # idempotent: the first run's start shows the shared display
        self._task = self._bar.add_task(self._label, total=total_steps, completed=done_steps, info="")

    def update(self, step: int, r: dict[str, Any]) -> None:
        info = (f"{r['tokens_per_s']:,.0f} tok/s loss {r['loss']:.3g} L0 {r['l0']:.0f} "
                f"EV {r['explained_variance']:.3f} dead {r['dead_fraction']:.0%}")
        self._bar.update(self._task, completed=step, info=info)

    def stop(self) -> None:
        self._bar.stop()
