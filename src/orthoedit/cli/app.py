"""The ``orthoedit`` application: the command groups, ``--version`` and the executable."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from .. import __version__
from ..errors import Terminated
from . import ui
from .helptext import Group

app = typer.Typer(
    cls=Group,
    name="orthoedit",
    help="Find a chat model's refusal direction and orthogonalize its weights against it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(
    cls=Group,
    help="Evaluate an edit: benchmark regression, safety and damage.\n\nBenchmarks through "
    "lm-eval, safety by refusals and guard-model verdicts, damage by first-token KL and "
    "cross-entropy.",
    no_args_is_help=True,
)
study_app = typer.Typer(cls=Group, help="Research: where refusal lives.", no_args_is_help=True)
export_app = typer.Typer(
    cls=Group,
    help="Export an edited checkpoint for other runtimes (GGUF for llama.cpp).\n\nGGUF "
    "files for llama.cpp and the runtimes built on it.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")
app.add_typer(study_app, name="study")
app.add_typer(export_app, name="export")


def _version(value: bool) -> None:
    if value:
        ui.out.print(f"orthoedit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """orthoedit: measure, edit, verify, evaluate and publish refusal-direction edits."""


def entry() -> None:
    """The ``orthoedit`` executable: SIGTERM (a CI timeout, ``docker stop``) interrupts like
    Ctrl-C, so staged outputs are removed and nothing is left half-written."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Exception as e:  # outside a command's guard: still one line, not a traceback
        try:
            ui.bug(e)
        except typer.Exit as done:
            raise SystemExit(done.exit_code) from None


def _terminate(signum, frame) -> None:
    raise Terminated()
