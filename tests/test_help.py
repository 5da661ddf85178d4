"""Every command's help, rendered at 100 columns, reads as one convention (orthoedit.cli.helptext):
no line wider than the terminal, no Python type names or ``<bool>`` for flags, arguments named
as in the text, choices shown, sentences wrapped by the terminal rather than cut mid-line."""

from __future__ import annotations

import re

import pytest
import typer
import typer.main
import typer.rich_utils
from typer.testing import CliRunner

from orthoedit.cli import app
from orthoedit.cli.helptext import ORDER, reflow

WIDTH = 100
runner = CliRunner()


def _commands(group, path=()):
    """(path, command) for the app, every group and every command under it."""
    yield path, group
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))
IDS = [" ".join(path) or "orthoedit" for path, _ in COMMANDS]
PYTHON_TYPES = re.compile(r"<(bool|str|int|float|path|list|tuple|dict)\b|list\[|Path\]|NoneType")


@pytest.fixture(autouse=True)
def hundred_columns(monkeypatch):
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", WIDTH)


def _help(path) -> str:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_fits_and_names_values_in_words(path, command):
    text = _help(path)
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert not PYTHON_TYPES.search(text), PYTHON_TYPES.search(text).group()
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage  # MODEL, not {model}
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.name.upper() in text
        elif getattr(param, "is_bool_flag", False):
            assert not param.metavar
        elif param.type_descriptor.is_choice:
            for choice in param.type_descriptor.choices:
                assert str(choice) in text, (param.name, choice)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_help_text_is_whole_sentences(path, command):
    """A single line break inside a paragraph is what left words alone on a line: the
    terminal wrapped each source line on its own. Every help text is reflowed."""
    for text in (command.help, command.short_help, *(p.help for p in command.params)):
        if text:
            assert reflow(text) == text
            for paragraph in text.split("\n\n"):
                assert "\n" not in paragraph


def test_commands_are_listed_in_pipeline_order():
    text = _help(())
    listed = re.findall(r"^│ (\w+) ", text, flags=re.MULTILINE)
    top = typer.main.get_command(app).commands
    assert sorted(listed) == sorted(top)
    assert listed == [n for n in ORDER if n in top]
    assert listed[:4] == ["measure", "search", "apply", "verify"]


def test_reflow_keeps_paragraphs():
    assert reflow("one\n  two\n\nthree\nfour") == "one two\n\nthree four"
    assert reflow(None) is None


@pytest.mark.parametrize(
    "path", [p for p, c in COMMANDS if getattr(c, "commands", None)], ids=lambda p: " ".join(p)
)
def test_a_group_lists_each_command_on_one_line(path):
    """The listing is each command's first sentence; the rest is the command's own --help."""
    text = _help(path)
    panel = text.split("Commands")[1].splitlines()[1:]
    rows = panel[: next(i for i, row in enumerate(panel) if row.startswith("╰"))]
    listed = [row for row in rows if re.match(r"^│ \w+ ", row)]
    assert len(listed) == len(rows), rows
