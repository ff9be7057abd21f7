"""The ``sae`` command: the trainer's commands plus ``profile-memory``.

It lives above both packages because ``profiling`` builds on ``trainer`` (it runs the trainer's
own step to measure it); registering it inside ``trainer`` would make the import run back up.
"""

from __future__ import annotations

from profiling.cli import profile_memory
from trainer.cli import app

app.command("profile-memory")(profile_memory)


def main() -> None:
    app()
