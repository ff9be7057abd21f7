"""What both command lines (``actcache`` and ``sae``) share: errors on stderr, logging setup."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Piped or under make, rich would assume 80 columns and cut wide tables into "…" cells.
console = Console(stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 160)


def fail(msg: str, code: int = 2) -> NoReturn:
    """A user error: one line on stderr, exit ``code``, no traceback. ``msg`` is plain text:
    brackets in it (``pip install 'actcache-sae[remote]'``) are not rich markup."""
    console.print(f"[red]error:[/red] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def new_app(help_text: str) -> typer.Typer:
    app = typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

    @app.callback()
    def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details.")) -> None:
        setup_logging(verbose)

    return app
