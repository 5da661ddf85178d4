"""Nothing lost: ``--overwrite`` replaces only what orthoedit wrote, no command writes over or
into what it reads, and an interrupted command (Ctrl-C or SIGTERM) leaves nothing behind.

Every command that writes an output is covered: apply, measure, search, eval bench, eval
safety, eval kl, compare, verify --report, study sites, attribute and run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import folder_digest, leftovers, sigint_as_on_a_terminal
from orthoedit.cli import app
from orthoedit.organism import CHAT_MODEL
from orthoedit.output import MARKER, check_target, clean_stale, staged_output

runner = CliRunner()


def cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *needles: str) -> str:
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture
def stranger(tmp_path) -> Path:
    """A folder orthoedit did not write, with a file in it someone cares about."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    return folder


def _folder_commands(model: Path, direction: Path, tmp_path: Path) -> dict[str, list]:
    """Each command whose --out is a folder, with inputs that are fine (``OUT`` to fill in)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\ndirection: {direction}\n")
    return {
        "apply": ["apply", model, "--direction", direction, "--out"],
        "measure": ["measure", model, "--out"],
        "search": ["search", model, "--candidates", tmp_path / "cands", "--out"],
        "eval bench": ["eval", "bench", model, model, "--out"],
        "eval safety": ["eval", "safety", model, "--out"],
        "study sites": ["study", "sites", model, "--direction", direction, "--out"],
        "attribute": ["attribute", model, "--direction", direction, "--out"],
        "run": ["run", recipe, "--out"],
    }


COMMANDS = ["apply", "measure", "eval bench", "eval safety", "study sites", "attribute"]


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_refuses_a_folder_orthoedit_did_not_write(
    command, model, direction_file, stranger, tmp_path
):
    before = folder_digest(stranger)
    args = _folder_commands(model, direction_file, tmp_path)[command]
    refused(cli(*args, stranger, "--overwrite"), "not written by orthoedit", "--out")
    assert folder_digest(stranger) == before
    assert leftovers(stranger.parent) == []


def test_search_and_run_never_take_over_a_stranger_folder(
    model, direction_file, stranger, tmp_path
):
    before = folder_digest(stranger)
    commands = _folder_commands(model, direction_file, tmp_path)
    refused(cli(*commands["search"], stranger, "--overwrite"), "not a search folder")
    refused(cli(*commands["run"], stranger), "not a run folder")
    assert folder_digest(stranger) == before


@pytest.mark.parametrize("command", [*COMMANDS, "search", "run"])
@pytest.mark.parametrize("where", ["cwd", "parent of cwd"])
def test_never_the_working_folder(command, where, model, direction_file, tmp_path, monkeypatch):
    """Even an orthoedit output may not be replaced while it holds the working folder."""
    work = tmp_path / "work"
    with staged_output(work) as tmp:
        (tmp / "result.json").write_text("{}")
    (work / "inner").mkdir()
    monkeypatch.chdir(work / "inner" if where == "parent of cwd" else work)
    before = folder_digest(work)
    target = ".." if where == "parent of cwd" else "."
    args = _folder_commands(model, direction_file, tmp_path)[command]
    flags = [] if command == "run" else ["--overwrite"]  # a run folder resumes without it
    refused(cli(*args, target, *flags), "working folder")
    assert folder_digest(work) == before


def test_never_the_home_folder(model, direction_file, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    line = refused(cli("apply", model, "--direction", direction_file, "--out", home, "--overwrite"))
    assert "home folder" in line


def test_overwrite_replaces_an_orthoedit_output_or_an_empty_folder(model, direction_file, tmp_path):
    written = tmp_path / "edited"
    assert cli("apply", model, "--direction", direction_file, "--out", written).exit_code == 0
    assert (written / MARKER).is_file()
    again = cli("apply", model, "--direction", direction_file, "--out", written, "--overwrite")
    assert again.exit_code == 0, again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    ok = cli("apply", model, "--direction", direction_file, "--out", empty, "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert (empty / MARKER).is_file()


@pytest.fixture
def victim(model_copy):
    """A model folder of one's own, to check that no command writes over or into it."""
    return model_copy("llama")


def test_no_command_writes_over_or_into_a_model_it_reads(victim, direction_file, tmp_path):
    before = folder_digest(victim)
    cases = [
        ["eval", "safety", victim, "--out", victim, "--overwrite"],
        ["eval", "safety", CHAT_MODEL, "--base", victim, "--out", victim / "s", "--overwrite"],
        ["eval", "bench", victim, CHAT_MODEL, "--out", victim, "--overwrite"],
        ["eval", "bench", CHAT_MODEL, victim, "--out", victim.parent, "--overwrite"],
        ["study", "sites", victim, "--direction", direction_file, "--out", victim, "--overwrite"],
        ["attribute", victim, "--direction", direction_file, "--out", victim / "a", "--overwrite"],
        ["measure", victim, "--out", victim / "d", "--overwrite"],
        ["apply", victim, "--direction", direction_file, "--out", victim, "--overwrite"],
        ["compare", victim, CHAT_MODEL, "--report", victim / "compare.md", "--overwrite"],
        ["eval", "kl", CHAT_MODEL, victim, "--report", victim / "config.json", "--overwrite"],
        ["verify", victim, victim, "--report", victim / "verify.json", "--overwrite"],
        ["search", victim, "--candidates", tmp_path / "c", "--out", victim / "s", "--overwrite"],
    ]
    for args in cases:
        line = refused(cli(*args))
        assert "this command reads" in line or "is an input" in line, (args, line)
    assert folder_digest(victim) == before


def test_no_output_over_a_direction_it_reads(model, tmp_path):
    """A measure folder used as --direction is an input too: apply may not replace it."""
    measured = tmp_path / "direction"
    with staged_output(measured) as tmp:
        from orthoedit.model.direction import save_direction

        save_direction(tmp / "direction.safetensors", __import__("torch").ones(32), {})
    before = folder_digest(measured)
    line = refused(
        cli(
            "apply",
            model,
            "--direction",
            measured / "direction.safetensors",
            "--out",
            measured,
            "--overwrite",
        )
    )
    assert "contains" in line
    assert folder_digest(measured) == before


@pytest.mark.parametrize(
    "args",
    [["compare", "{m}", "{m}", "--report", "{f}"], ["eval", "kl", "{m}", "{m}", "--report", "{f}"]],
    ids=["compare", "eval kl"],
)
def test_file_outputs_need_overwrite(args, model, tmp_path):
    existing = tmp_path / "mine.txt"
    existing.write_text("keep")
    filled = [str(a).format(m=model, f=existing) for a in args]
    refused(cli(*filled), "already exists", "--overwrite")
    (tmp_path / "adir").mkdir()
    filled = [str(a).format(m=model, f=tmp_path / "adir") for a in args]
    refused(cli(*filled, "--overwrite"), "is not a file")
    assert existing.read_text() == "keep"


def test_verify_report_needs_overwrite(model, direction_file, tmp_path):
    edited = tmp_path / "edited"
    assert cli("apply", model, "--direction", direction_file, "--out", edited).exit_code == 0
    report = tmp_path / "verify.json"
    report.write_text("mine")
    refused(cli("verify", model, edited, "--report", report), "already exists", "--overwrite")
    assert report.read_text() == "mine"
    result = cli("verify", model, edited, "--report", report, "--overwrite")
    assert result.exit_code == 0, result.output
    assert '"passed"' in report.read_text() or "max_logit_diff" in report.read_text()


def test_run_with_a_fixed_direction_keeps_a_foreign_direction_folder(
    model, direction_file, tmp_path
):
    """The recipe's copy stage used to delete OUT/direction whatever it held."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model}\ndirection: {direction_file}\n")
    out = tmp_path / "run"
    assert cli("run", recipe, "--out", out).exit_code == 0
    (out / "direction" / MARKER).unlink()  # as if someone else's folder stood there
    (out / "direction" / "mine.txt").write_text("keep")
    direction_file_copy = tmp_path / "d2.safetensors"
    direction_file_copy.write_bytes(direction_file.read_bytes())
    recipe.write_text(f"model: {model}\ndirection: {direction_file_copy}\n")
    refused(cli("run", recipe, "--out", out), "not written by orthoedit")
    assert (out / "direction" / "mine.txt").read_text() == "keep"


# --- staging left behind ---------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_dead_process_is_removed(model, direction_file, tmp_path):
    target = tmp_path / "edited"
    stale = tmp_path / f".edited.orthoedit-{_dead_pid()}-x1y2"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f".edited.orthoedit-{os.getpid()}-live"  # a live process's: kept
    alive.mkdir()
    other = tmp_path / f".other.orthoedit-{_dead_pid()}-zz"  # another target's: kept
    other.mkdir()
    assert cli("apply", model, "--direction", direction_file, "--out", target).exit_code == 0
    assert not stale.exists()
    assert alive.exists() and other.exists()


def test_an_output_set_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between moving the old output aside and renaming the new one into place."""
    target = tmp_path / "out"
    aside = tmp_path / f".out.old-{_dead_pid()}-ab"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / MARKER).write_text("{}")
    (aside / "out" / "report.json").write_text("previous")
    clean_stale(target)
    assert (target / "report.json").read_text() == "previous"
    assert leftovers(tmp_path) == []
    check_target(target, overwrite=True)  # it is orthoedit's again, so it may be replaced
    with staged_output(target) as tmp:
        (tmp / "report.json").write_text("new")
    assert (target / "report.json").read_text() == "new"
    assert leftovers(tmp_path) == []


# --- interrupts --------------------------------------------------------------------------

SLOW_APPLY = """
import sys, time
import orthoedit.edit.apply as apply
original = apply.stream_edit
def slow(*args, **kwargs):
    result = original(*args, **kwargs)
    print("staged", flush=True)
    time.sleep(120)
    return result
apply.stream_edit = slow
from orthoedit.cli import entry
sys.argv = ["orthoedit", *sys.argv[1:]]
entry()
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_apply_cleans_up_and_says_so(sig, code, model, direction_file, tmp_path):
    out = tmp_path / "parent" / "edited"
    out.parent.mkdir()
    args = ["apply", str(model), "--direction", str(direction_file), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_APPLY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_on_a_terminal,
    )
    assert proc.stdout.readline().strip() == "staged"
    assert leftovers(out.parent), "the edit should be staged beside the target by now"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert f"interrupted; nothing was written to {out}" in " ".join(stderr.split())
    assert "Traceback" not in stderr
    assert not out.exists()
    assert leftovers(out.parent) == []
