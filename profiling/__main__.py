"""``python -m profiling profile-memory ...``: the same command as ``sae profile-memory``, standalone."""

import typer

from profiling.cli import profile_memory

app = typer.Typer(pretty_exceptions_enable=False, add_completion=False, no_args_is_help=True)
app.callback()(lambda: None)
app.command("profile-memory")(profile_memory)

if __name__ == "__main__":
    app()
