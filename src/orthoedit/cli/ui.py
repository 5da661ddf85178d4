"""What the command line shows: its consoles, library log lines, the progress display, and
errors as one line with an exit code."""

from __future__ import annotations

import contextlib

import typer
from pydantic import ValidationError
from rich import filesize
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, ProgressColumn, TimeElapsedColumn
from rich.text import Text

from .. import __version__
from ..errors import OrthoeditError, Terminated


def console(stderr: bool = False, width: int | None = None) -> Console:
    """orthoedit's consoles: prose is left to the terminal to wrap (soft wrap), so a long line,
    such as a command to copy, is never broken mid-sentence; tables fit the width."""
    return Console(stderr=stderr, width=width, soft_wrap=True)


#: Results go to ``out``; log lines, progress, warnings and errors to ``err``. Commands look
#: them up here when they print (``ui.out``), so a test can swap them.
out = console()
err = console(stderr=True)


def log(message: str) -> None:
    """A progress line of the library's, dim, wrapped by the terminal (not at 80 columns)."""
    err.print(f"[dim]{escape(message)}[/dim]", soft_wrap=True, highlight=False)


def error(message: str, label: str = "error") -> None:
    """One red ``error:`` (or ``FAIL:``) line on stderr."""
    err.print(f"[red]{label}:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One yellow ``warning:`` line on stderr."""
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def wrote(what: str) -> None:
    """The closing ``wrote PATH (...)`` line of a command that wrote files."""
    out.print(f"wrote {escape(what)}")


def guarded(fn, target=None, interrupted: str | None = None):
    """Run a library call; user errors become one red line and their exit code. An interrupt
    (Ctrl-C, or SIGTERM through ``entry``) says what became of the output: ``interrupted``,
    or that nothing was written to ``target``."""
    try:
        return fn()
    except KeyboardInterrupt as e:
        where = f" to {target}" if target is not None else ""
        err.print(interrupted or f"interrupted; nothing was written{where}.", soft_wrap=True)
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    except OrthoeditError as e:
        error(str(e))
        raise typer.Exit(e.exit_code) from None
    except ValidationError as e:
        error(option_error(e))
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except Exception as e:  # not foreseen: a bug, reported in one line with its traceback
        bug(e)


def bug(e: Exception) -> None:
    """An exception orthoedit did not foresee: one line naming it and the log file that holds
    the traceback, exit 1 (bad input is checked before anything runs and exits 2)."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="orthoedit-error-", suffix=".log")
    with open(fd, "w") as f:
        f.write(f"orthoedit {__version__}\n")
        f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    first = (str(e).strip().splitlines() or [""])[0][:200]
    error(
        f"unexpected {type(e).__name__}: {first}. This is a bug in orthoedit; the traceback "
        f"is in {path} (please attach it to a report)."
    )
    raise typer.Exit(1) from None


_SIGNS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def option_error(e: ValidationError) -> str:
    """A config's validation error in the CLI's words: ``--n-train must be >= 2``, naming the
    option (a list's item too: ``--sites``), not the pydantic field. An error of the options
    together (a model validator) is its own message."""
    first = e.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:
        return msg
    option = "--" + str(first["loc"][0]).replace("_", "-")
    if msg.startswith(option):
        return msg
    if first["type"] in _SIGNS:
        bound = next(iter((first.get("ctx") or {}).values()), "")
        return f"{option} must be {_SIGNS[first['type']]} {bound}"
    given = f" {first['input']!r}" if first["type"] == "literal_error" else ""
    return f"{option}{given}: {msg.replace('Input should be', 'must be')}"


class _Count(ProgressColumn):
    """``12/64``; bytes (``1.2/3.4 GB``) for a step counted in bytes (a million or more)."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        done, total = int(task.completed), int(task.total)
        if total >= 1_000_000:
            return Text(f"{filesize.decimal(done)}/{filesize.decimal(total)}", style="green")
        return Text(f"{done}/{total}", style="green")


def bar() -> Progress:
    """A progress display on stderr, gone when it ends: step name, bar, percentage, count and
    elapsed time."""
    columns = (*Progress.get_default_columns()[:-1], _Count(), TimeElapsedColumn())
    return Progress(*columns, console=err, transient=True)


def stage_bar(display: Progress, task):
    """A ``progress.Progress`` that drives one row (``task``) of a rich Progress display."""
    from ..progress import Progress as StageProgress

    class Row(StageProgress):
        def __init__(self):
            self.task = task

        def start(self, name: str, total: int | None) -> None:
            # a new step is a new row: its count and elapsed time start from zero
            display.remove_task(self.task)
            self.task = display.add_task(escape(name), total=total)

        def advance(self, n: int = 1) -> None:
            display.advance(self.task, n)

        def stop(self) -> None:
            display.stop()

    return Row()


@contextlib.contextmanager
def progress():
    """A command's one progress display: the current step's row (a library's own bars drive
    it too, see progress.py)."""
    with bar() as display:
        yield stage_bar(display, display.add_task("loading", total=None))
