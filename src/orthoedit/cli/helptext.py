"""How ``orthoedit --help`` reads: one convention for every command, applied where the command
tree is built, so that a new command or option follows it without a word of its own.

* Commands are listed in pipeline order (``ORDER``), not in the order they are defined.
* Help text is reflowed: a docstring's single line breaks are joined, so the terminal wraps
  whole sentences (paragraphs, separated by a blank line, stay apart).
* A group lists each command by the first sentence of its help, one line; the rest of the
  help is the command's own ``--help``.
* A usage error (an unknown option, a missing argument, a value not among the choices) is
  one ``error:`` line, as every other bad input is.
* Value names are words, not Python types: ``TEXT``, ``INT``, ``FLOAT``, ``PATH``; the choices
  where there are a few (``untie|skip|edit``); none for on/off flags; arguments by their name
  (``MODEL``), in the usage line too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import get_args, get_origin

from typer._click.exceptions import ClickException
from typer._click.utils import echo as click_echo
from typer.core import TyperArgument, TyperGroup, TyperOption

#: The order commands are listed in: the pipeline first, then the whole-run commands, then
#: research. Commands not named here follow, in the order they were defined.
ORDER = (
    "measure",
    "search",
    "apply",
    "verify",
    "architectures",
    "eval",
    "compare",
    "export",
    "push",
    "run",
    "demo",
    "study",
    "attribute",
    # eval's subcommands
    "bench",
    "safety",
    "kl",
)

#: Choices wider than this are listed in the option's help instead, so the value column stays
#: narrow enough for the help beside it.
MAX_CHOICES_WIDTH = 16

_NAMES = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOL"}


def reflow(text: str | None) -> str | None:
    """Paragraphs (separated by a blank line) with their single line breaks joined."""
    if not text:
        return text
    paragraphs = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def first_sentence(text: str | None) -> str | None:
    """The first sentence of a help text's first paragraph: what a group lists a command by."""
    if not text:
        return text
    paragraph = reflow(text).split("\n\n")[0]
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]


def value_name(param) -> str:
    """The word shown for what an option or argument takes."""
    if isinstance(param, TyperArgument):
        return param.name.upper()
    if param.is_bool_flag:
        return ""
    described = param.type_descriptor
    if described.is_choice:
        choices = _choices(param)
        if len("|".join(choices)) <= MAX_CHOICES_WIDTH:
            return "|".join(choices)
        return param.opts[0].lstrip("-").upper()  # the choices go into the help text
    annotation = described.annotation
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    if described.is_path or annotation is Path:
        return "PATH"
    if get_origin(annotation) is tuple:
        return " ".join(_NAMES.get(a, "TEXT") for a in get_args(annotation))
    return _NAMES.get(annotation, "TEXT")


def _choices(param) -> list[str]:
    return [str(getattr(c, "value", c)) for c in param.type_descriptor.choices or ()]


def tidy(command) -> None:
    """Apply the convention to one command (once)."""
    if getattr(command, "_tidy", False):
        return
    command._tidy = True
    command.help = reflow(command.help)
    command.short_help = reflow(command.short_help) or first_sentence(command.help)
    for param in command.params:
        if isinstance(param, TyperArgument):
            _name_argument(param)
        elif isinstance(param, TyperOption):
            if param.metavar is None:
                param.metavar = value_name(param)
            if param.type_descriptor.is_choice and "|" not in param.metavar:
                listed = ", ".join(_choices(param))
                param.help = f"{param.help or ''} One of: {listed}.".strip()
    made = command.get_help_option  # --help is made when help is asked for

    def get_help_option(ctx):
        option = made(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


def _name_argument(param: TyperArgument) -> None:
    """An argument shows as its name, in the usage line too (``MODEL``, ``[PROMPTS]...``),
    with no type beside it."""
    name = param.metavar or value_name(param)
    param.metavar = name
    usage = name if param.required else f"[{name}]"
    usage += "..." if param.nargs != 1 else ""
    param._usage_display_name = lambda: usage
    param.display_type_rich = lambda ctx: None


class Group(TyperGroup):
    """A command group that lists its commands in ``ORDER`` and tidies each command's help
    (``typer.Typer(cls=Group)`` for the app and every sub-app)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tidy(self)
        for command in self.commands.values():
            tidy(command)

    def list_commands(self, ctx) -> list[str]:
        names = list(self.commands)
        rank = {name: i for i, name in enumerate(ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(ORDER)), names.index(n)))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """A usage error (an unknown option, a missing argument, a value not among the
        choices) is one line, like every other bad input, exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                click_echo(e.ctx.get_help(), color=e.ctx.color)
            else:
                click_echo(usage_line(e), err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def usage_line(e) -> str:
    """``error: MESSAGE; see orthoedit CMD --help.``, the message in click's words less
    pydantic's ``Value error,`` prefix."""
    message = " ".join(e.format_message().replace("Value error, ", "").split())
    ctx = getattr(e, "ctx", None)
    hint = f"; see {ctx.command_path} --help" if ctx is not None else ""
    return f"error: {message.rstrip('.')}{hint}."
