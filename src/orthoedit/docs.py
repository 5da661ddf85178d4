"""The command reference (docs/reference/COMMAND.md), made from the same Typer app that makes
``--help``, so the two cannot drift: each command's usage, help and options (flag, value,
default, description), which ``cli/options.py`` makes from the stage's config model.

A page holds prose written by hand above ``MARKER`` and the generated part below it; only
the part below is rewritten (``python -m orthoedit.docs [FOLDER]``, ``make docs``) and
checked (``stale_pages``, run by the tests). The folder's ``README.md`` is the index: every
command by the first sentence of its help, as ``orthoedit --help`` lists it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

#: The line above which a page is written by hand; below it, by ``write_pages``.
MARKER = (
    "<!-- Generated from the command's options by `make docs` (orthoedit.docs); edit the "
    "config model's descriptions in src/orthoedit/config.py, not the text below. -->"
)
FOLDER = Path("docs") / "reference"
INDEX = "README.md"


def commands() -> dict[str, object]:
    """Every command under the app by its path (``eval bench``), groups left out, in the
    order ``--help`` lists them."""
    import typer.main

    from .cli import app

    found = {}

    def walk(command, path: tuple[str, ...]) -> None:
        for name in command.list_commands(None):
            sub = command.commands[name]
            if getattr(sub, "commands", None):
                walk(sub, (*path, name))
            else:
                found[" ".join((*path, name))] = sub

    walk(typer.main.get_command(app), ())
    return found


def page_name(path: str) -> str:
    """``eval bench`` -> ``eval-bench.md``."""
    return path.replace(" ", "-") + ".md"


def _text(help_text: str | None) -> str:
    """Help as Markdown: rich's escapes undone, table cells kept whole."""
    text = re.sub(r"\\\[", "[", help_text or "")
    return text.replace("|", "\\|").replace("\n\n", " ")


def _default(param) -> str:
    if param.required:
        return "required"
    default = param.default
    if getattr(param, "is_bool_flag", False):
        return "on" if default else "off"
    if default is None or default == [] or default == ():
        return ""
    if isinstance(default, list | tuple):
        default = ",".join(str(d) for d in default)
    return f"`{default}`"


def _flags(param) -> str:
    if param.param_type_name == "argument":
        return f"`{param.metavar}`"
    names = [param.opts[0], *param.secondary_opts]
    return " / ".join(f"`{n}`" for n in names)


def generated(path: str, command) -> str:
    """The generated part of one command's page (below ``MARKER``)."""
    args = [p.metavar for p in command.params if p.param_type_name == "argument"]
    usage = " ".join(["orthoedit", path, *args, "[OPTIONS]"])
    help_text = re.sub(r"\\\[", "[", command.help or "")
    lines = ["## Usage", "", "```", usage, "```", "", help_text, ""]
    lines += ["## Options", "", "| option | value | default | description |", "|---|---|---|---|"]
    for param in command.params:
        value = "" if param.param_type_name == "argument" else param.metavar or ""
        value = f"`{value}`" if value else ""
        row = [_flags(param), value.replace("|", "\\|"), _default(param), _text(param.help)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def index(found: dict[str, object]) -> str:
    """The reference's README.md: a link and a line per command (the first sentence of its
    help, as a group's --help lists it)."""
    from .cli.helptext import first_sentence

    lines = ["| command | what it does |", "|---|---|"]
    for path, command in found.items():
        line = _text(command.short_help or first_sentence(command.help))
        lines.append(f"| [`orthoedit {path}`]({page_name(path)}) | {line} |")
    return "\n".join(lines) + "\n"


def pages(folder: Path) -> dict[Path, tuple[str, object]]:
    """Every page of the reference and what makes its generated part: (path, command) for a
    command's page, ("", the index's text) for the index."""
    found = commands()
    made: dict[Path, tuple[str, object]] = {folder / INDEX: ("", index(found))}
    for path, command in found.items():
        made[folder / page_name(path)] = (path, command)
    return made


def _generated(path: str, made) -> str:
    return made if isinstance(made, str) else generated(path, made)


def render(page: str | None, path: str, command) -> str:
    """A page with its hand-written part kept (a title only, for a new page) and the
    generated part made anew."""
    prose = f"# orthoedit {path}\n\n" if path else "# Command reference\n\n"
    if page is not None and MARKER in page:
        prose = page.split(MARKER, 1)[0]
    return prose + MARKER + "\n\n" + _generated(path, command)


def write_pages(folder: Path = FOLDER) -> list[Path]:
    """Rewrite the generated part of every command's page; returns the pages changed."""
    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for target, (path, command) in pages(folder).items():
        page = target.read_text(encoding="utf-8") if target.is_file() else None
        made = render(page, path, command)
        if made != page:
            target.write_text(made, encoding="utf-8")
            changed.append(target)
    return changed


def stale_pages(folder: Path = FOLDER) -> list[str]:
    """Pages missing, or whose generated part differs from what the app makes now."""
    stale = []
    for target, (path, command) in pages(folder).items():
        page = target.read_text(encoding="utf-8") if target.is_file() else ""
        below = page.split(MARKER, 1)[1] if MARKER in page else None
        if below != "\n\n" + _generated(path, command):
            stale.append(str(target))
    return stale


if __name__ == "__main__":
    written = write_pages(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)
    for page in written:
        print(f"wrote {page}")
    print(f"{len(written)} page(s) changed")
