"""Commands made from a stage's config model: an option is declared once, as a field of the
stage's pydantic model in ``config.py`` (its type, default, bounds and description), and the
command line, the recipe schema and the card all read it from there.

``command(group, NAME, Config)`` registers a function of one argument, the validated config,
as ``orthoedit NAME``: each field is an option (``--n-train`` for ``n_train``; a bool is
``--x/--no-x``), or an argument when named in ``arguments``; its help is the field's
description. Where the command line spells a value differently from the field (``--sites
embed,attn``, ``--direction-layers LO:HI``), a ``Cli`` entry says how, and parses it.

Options are listed in one order for every command: the arguments, the stage's own options in
the order its model declares them, the generation backend's, the safety judge's, then the
options every model-running command ends with (``TAIL``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args

import typer
from pydantic import BaseModel
from rich.markup import escape

from . import ui

#: The options that close a command's list, in this order.
TAIL = (
    "system",
    "template",
    "revision",
    "dtype",
    "device",
    "max_memory",
    "offload_folder",
    "batch_size",
    "report",
    "overwrite",
    "dry_run",
)
#: The safety judge's options (``config._Judged``), kept together.
JUDGE = ("judge", "judge_model", "judge_api_key_env", "judge_timeout", "judge_retries")
#: How a command generates (``config._Generated``), kept together before the judge's.
GENERATED = ("backend", "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization")

_FIELD = object()  # "as the field has it"


@dataclass(frozen=True)
class Cli:
    """How one field reads on the command line where that differs from the field."""

    type: Any = _FIELD  # the value's type on the command line
    parse: Callable[[Any], Any] | None = None  # command-line value -> the field's value
    default: Any = _FIELD
    flag: str | None = None  # default: --field-name
    metavar: str | None = None
    help: str = ""  # added to the field's description


def items(text: str | None) -> list[str] | None:
    """A comma-separated list (``embed,attn``); blanks dropped."""
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def order(config: type[BaseModel], arguments: tuple[str, ...]) -> list[str]:
    """The fields of ``config`` in the command line's order."""
    names = list(config.model_fields)
    grouped = (*arguments, *GENERATED, *JUDGE, *TAIL)
    return [
        *arguments,
        *(n for n in names if n not in grouped),
        *(n for n in GENERATED if n in names),
        *(n for n in JUDGE if n in names),
        *(n for n in TAIL if n in names),
    ]


def _is_bool(annotation) -> bool:
    return annotation is bool or (bool in get_args(annotation) and len(get_args(annotation)) == 2)


def parameters(
    config: type[BaseModel], arguments: tuple[str, ...] = (), cli: dict[str, Cli] | None = None
) -> list[inspect.Parameter]:
    """The command's parameters, one per field of ``config``, as Typer reads them."""
    cli = cli or {}
    made = []
    for name in order(config, arguments):
        field = config.model_fields[name]
        spec = cli.get(name, Cli())
        kind = field.annotation if spec.type is _FIELD else spec.type
        if spec.default is not _FIELD:
            default = spec.default
        elif field.is_required():
            default = inspect.Parameter.empty
        else:
            default = field.get_default(call_default_factory=True)
        text = escape(field.description or "") + spec.help
        if name in arguments:
            info = typer.Argument(help=text, metavar=spec.metavar)
        else:
            flag = spec.flag or "--" + name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if _is_bool(kind) else [flag]
            info = typer.Option(*decls, help=text, metavar=spec.metavar)
        made.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, info],
            )
        )
    return made


def command(
    group: typer.Typer,
    name: str,
    config: type[BaseModel],
    *,
    arguments: tuple[str, ...] = ("model",),
    cli: dict[str, Cli] | None = None,
):
    """Register ``body(cfg)`` as ``orthoedit NAME`` (under ``group``), with ``config``'s fields
    as its options; bad values are one error line and exit 2 before ``body`` runs."""
    cli = cli or {}

    def parsed(given: dict) -> dict:
        return {
            key: cli[key].parse(value) if key in cli and cli[key].parse else value
            for key, value in given.items()
        }

    def register(body: Callable[[Any], None]):
        def run(**given) -> None:
            body(ui.guarded(lambda: config(**parsed(given))))

        run.__signature__ = inspect.Signature(parameters(config, arguments, cli))  # type: ignore[attr-defined]
        run.__doc__, run.__name__ = body.__doc__, body.__name__
        group.command(name)(run)
        return body

    return register
