"""The command line: help text from the config models, --version, dry runs, exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.rich_utils
from typer.testing import CliRunner

import orthoedit
import orthoedit.cli.ui as ui
from conftest import folder_digest, leftovers
from orthoedit.cli import app
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import prepare
from orthoedit.edit.plan import Plan
from orthoedit.model.checkpoint import Checkpoint

runner = CliRunner()
EMBED = "model.embed_tokens.weight"
O_PROJ = "model.layers.{}.self_attn.o_proj.weight"
DOWN = "model.layers.{}.mlp.down_proj.weight"


def cli(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """Render help and plan tables wide enough that no name or sentence is cut or wrapped."""
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)
    monkeypatch.setattr(ui, "out", ui.console(width=400))
    monkeypatch.setattr(ui, "err", ui.console(stderr=True, width=400))


def one_line_error(result) -> str:
    """A bad-input exit: code 2 and a single line starting with ``error:``; returns it."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def flat(text: str) -> str:
    """Help text with box drawing removed and whitespace collapsed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# --- help and version ----------------------------------------------------------------------


def test_app_help():
    result = cli("--help")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "apply" in text and "verify" in text and "--version" in text
    assert "orthogonalize its weights" in text


def test_no_arguments_shows_help():
    result = cli()
    assert "apply" in result.output and "verify" in result.output
    assert result.exit_code in (0, 2)


# Descriptions without square brackets (rich markup in help text is a separate, known issue).
def _described(model, name: str) -> str:
    return model.model_fields[name].description.split("[")[0].split("{")[0].strip()


@pytest.mark.parametrize(
    ("command", "model", "options"),
    [
        (
            "apply",
            ApplyConfig,
            {
                "direction": "--direction",
                "out": "--out",
                "direction_layer": "--direction-layer",
                "per_layer": "--per-layer",
                "revision": "--revision",
                "base_model": "--base-model",
                "sites": "--sites",
                "layers": "--layers",
                "scales": "--scales",
                "tied": "--tied",
                "method": "--method",
                "harmless_mean": "--harmless-mean",
                "overwrite": "--overwrite",
                "dry_run": "--dry-run",
                "model": None,
            },
        ),
        (
            "verify",
            VerifyConfig,
            {
                "revision": "--revision",
                "prompts": "--prompts",
                "column": "--column",
                "split": "--split",
                "max_prompts": "--max-prompts",
                "dtype": "--dtype",
                "device": "--device",
                "max_memory": "--max-memory",
                "offload_folder": "--offload-folder",
                "report": "--report",
                "overwrite": "--overwrite",
                "source": None,
                "edited": None,
            },
        ),
    ],
)
def test_command_help_comes_from_the_config_model(command, model, options):
    result = cli(command, "--help")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert set(options) == set(model.model_fields)  # every config field is a CLI option
    for field, flag in options.items():
        if flag is not None:
            assert flag in text, flag
        assert _described(model, field) in text, field


def test_apply_help_lists_tied_policies():
    text = flat(cli("apply", "--help").output)
    for policy in ("untie", "skip", "edit"):
        assert policy in text


def test_help_keeps_square_brackets():
    text = flat(cli("apply", "--help").output)
    assert "[d_model], a [k, d_model] span" in text and "or [n_layers, d_model]" in text


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"orthoedit {orthoedit.__version__}"


# --- apply: dry run and usage --------------------------------------------------------------


def dry_run(src: Path, direction: Path, *args: str):
    result = cli("apply", src, "--direction", direction, "--dry-run", *args)
    assert result.exit_code == 0, result.output
    return result


def listed(result, name: str) -> bool:
    return re.search(rf"(^|\s){re.escape(name)}(\s|$)", result.stdout, re.M) is not None


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_model, direction_file, tmp_path):
    src = tiny_model("llama")
    before = folder_digest(src)
    out = tmp_path / "edited"
    result = dry_run(src, direction_file, "--out", str(out))
    plan = prepare(
        ApplyConfig(model=str(src), direction=direction_file, out=out, dry_run=True)
    ).plan
    assert len(plan.ops) == 5  # embedding + o_proj and down_proj of 2 layers
    for op in plan.ops:
        assert listed(result, op.tensor), op.tensor
    assert f"plan: {len(plan.ops)} tensors (llama, d_model 32)" in result.stdout
    for name in ("lm_head.weight", "self_attn.q_proj", "mlp.up_proj", "input_layernorm"):
        assert name not in result.stdout  # readers and norms are never planned
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert folder_digest(src) == before


def test_long_lines_are_not_broken_on_a_narrow_terminal(
    tiny_model, direction_file, tmp_path, monkeypatch
):
    """Prose (a path, a command to copy, an error) is one line for the terminal to wrap, never
    broken by rich at the console's width; tables still fit it."""
    monkeypatch.setattr(ui, "out", ui.console(width=40))
    monkeypatch.setattr(ui, "err", ui.console(stderr=True, width=40))
    out = tmp_path / ("a-folder-with-a-name-longer-than-the-terminal-is-wide" * 2)
    result = cli("apply", tiny_model("llama"), "--direction", direction_file, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (" in result.stdout  # on one line
    again = cli("apply", tiny_model("llama"), "--direction", direction_file, "--out", out)
    assert again.exit_code == 2
    (line,) = again.stderr.strip().splitlines()
    assert str(out) in line


def test_apply_without_out_is_a_usage_error(tiny_model, direction_file):
    result = cli("apply", tiny_model("llama"), "--direction", direction_file)
    assert result.exit_code == 2
    assert "--out" in result.stderr
    assert "plan:" not in result.stdout


def test_apply_without_direction_is_a_usage_error(tiny_model, tmp_path):
    result = cli("apply", tiny_model("llama"), "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "--direction" in result.output
    assert not (tmp_path / "x").exists()


def test_sites_and_layers_select_one_tensor(tiny_model, direction_file):
    result = dry_run(tiny_model("llama"), direction_file, "--sites", "attn", "--layers", "1:2")
    assert listed(result, O_PROJ.format(1))
    for name in (O_PROJ.format(0), DOWN.format(0), DOWN.format(1), EMBED):
        assert not listed(result, name), name
    assert "plan: 1 tensors" in result.stdout


def test_layers_are_half_open_and_accept_negatives(tiny_model, direction_file):
    result = dry_run(tiny_model("llama"), direction_file, "--sites", "mlp", "--layers", "-1:")
    assert listed(result, DOWN.format(1)) and not listed(result, DOWN.format(0))
    assert not listed(result, O_PROJ.format(1))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--layers", "1:1"), "selects no layer"),
        (("--layers", "5:9"), "outside this 2-layer model"),
        (("--layers", "one:two"), "START:END"),
        (("--sites", "attn,foo"), "sites"),
        (("--direction-layer", "0"), "--direction-layer"),
    ],
    ids=["empty-layers", "outside-layers", "bad-layers", "bad-site", "row-of-single-direction"],
)
def test_bad_options_exit_2(args, needle, tiny_model, direction_file, tmp_path):
    out = tmp_path / "edited"
    result = cli("apply", tiny_model("llama"), "--direction", direction_file, "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unknown_tied_policy_is_a_usage_error(tiny_model, direction_file):
    result = cli(
        "apply",
        tiny_model("llama", tie=True),
        "--direction",
        direction_file,
        "--dry-run",
        "--tied",
        "sometimes",
    )
    assert result.exit_code == 2
    assert "--tied" in result.output


# --- tied embeddings -----------------------------------------------------------------------


UNTIE_NOTE = "untie: lm_head.weight will be written as the original embedding"


def test_tied_default_policy_unties(tiny_model, direction_file):
    result = dry_run(tiny_model("llama", tie=True), direction_file)
    assert listed(result, EMBED)
    assert UNTIE_NOTE in result.stdout
    assert "warning" not in result.stderr


def test_tied_untie_is_the_llama_default(tiny_model, direction_file):
    src = tiny_model("llama", tie=True)
    assert (
        dry_run(src, direction_file).stdout
        == dry_run(src, direction_file, "--tied", "untie").stdout
    )


def test_tied_skip_leaves_the_embedding(tiny_model, direction_file):
    result = dry_run(tiny_model("llama", tie=True), direction_file, "--tied", "skip")
    assert not listed(result, EMBED)
    assert listed(result, O_PROJ.format(0)) and listed(result, DOWN.format(1))
    assert UNTIE_NOTE not in result.stdout
    assert "warning:" in result.stderr and "'skip'" in result.stderr
    assert "plan: 4 tensors" in result.stdout


def test_tied_edit_edits_in_place(tiny_model, direction_file):
    result = dry_run(tiny_model("llama", tie=True), direction_file, "--tied", "edit")
    assert listed(result, EMBED)
    assert UNTIE_NOTE not in result.stdout
    assert "warning:" in result.stderr and "not equivalent" in result.stderr


def test_untied_model_ignores_tied_policy(tiny_model, direction_file):
    src = tiny_model("llama")
    for policy in ("untie", "skip", "edit"):
        result = dry_run(src, direction_file, "--tied", policy)
        assert listed(result, EMBED)
        assert UNTIE_NOTE not in result.stdout
        assert "warning" not in result.stderr


# --- verify exit codes ---------------------------------------------------------------------


@pytest.fixture
def applied(tiny_model, direction_file, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "edited"
    result = cli("apply", src, "--direction", direction_file, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert leftovers(tmp_path) == []
    return src, out


def _overwrite_tensor(src: Path, out: Path, name: str, data: bytes | None = None) -> None:
    """Write ``data`` (default: the source's original bytes) over tensor ``name`` in ``out``."""
    source, edited = Checkpoint.open(src), Checkpoint.open(out)
    info, target = source.tensors[name], edited.tensors[name]
    if data is None:
        with open(info.file, "rb") as f:
            f.seek(info.start)
            data = f.read(info.nbytes)
    assert len(data) == target.nbytes
    with open(target.file, "r+b") as f:
        f.seek(target.start)
        f.write(data)


def test_verify_passes_on_a_clean_apply(applied, tmp_path):
    src, out = applied
    report = tmp_path / "report.json"
    result = cli("verify", src, out, "--max-prompts", "3", "--report", report)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["failures"] == []
    assert data["prompts"] == 3
    assert data["unedited_identical"] and data["headers_identical"]


def test_verify_fails_when_an_edited_tensor_is_reverted(applied, tmp_path):
    src, out = applied
    _overwrite_tensor(src, out, O_PROJ.format(1))  # the source's unedited bytes
    report = tmp_path / "report.json"
    result = cli("verify", src, out, "--max-prompts", "3", "--report", report)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stderr and "PASS" not in result.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is False
    assert data["worst_tensor"] == O_PROJ.format(1)
    assert data["unedited_identical"]  # the tampered tensor is an edited one


def test_verify_fails_when_an_unedited_tensor_changes(applied):
    src, out = applied
    name = "model.layers.0.self_attn.q_proj.weight"
    nbytes = Checkpoint.open(out).tensors[name].nbytes
    _overwrite_tensor(src, out, name, bytes(nbytes))  # zeros
    result = cli("verify", src, out, "--max-prompts", "2")
    assert result.exit_code == 1, result.output
    assert "unedited tensors differ" in result.stderr and name in result.stderr


def test_verify_rejects_a_plan_for_another_family(applied, tiny_model):
    _, out = applied
    plan = json.loads((out / "plan.json").read_text())
    plan["family"] = "gemma2"
    (out / "plan.json").write_text(json.dumps(plan))
    Plan.load(out)  # still a valid plan, just not for this source
    result = cli("verify", tiny_model("llama"), out)
    assert result.exit_code == 2
    assert "the plan is for gemma2" in result.stderr


def test_verify_reads_prompt_files_as_every_command_does(applied, tmp_path, monkeypatch):
    """A .jsonl of objects gives its prompt fields (not each JSON line as a prompt); a binary
    file is one clean error line."""
    from orthoedit import verify as V

    src, out = applied
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "Name a color."}\n{"prompt": "Count to three."}\n')
    seen = []
    real = V.encode_prompts
    monkeypatch.setattr(V, "encode_prompts", lambda tok, p: seen.extend(p) or real(tok, p))
    result = cli("verify", src, out, "--prompts", rows, "--max-prompts", "2")
    assert result.exit_code == 0, result.output
    assert seen == ["Name a color.", "Count to three."]
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01garbage")
    result = cli("verify", src, out, "--prompts", binary)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "not UTF-8" in result.stderr


def test_an_unforeseen_exception_is_one_line_with_its_log(monkeypatch, tmp_path):
    """A bug (an exception orthoedit did not foresee) is one line, exit 1, with the traceback
    in a log file it names; never a Python traceback on the terminal."""
    import re

    import orthoedit.verify

    def broken(cfg, log):
        raise RuntimeError("something deep went wrong\nsecond line")

    monkeypatch.setattr(orthoedit.verify, "verify", broken)
    result = cli("verify", "some/model", tmp_path)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unexpected RuntimeError: something deep went wrong" in lines[0]
    log = Path(re.search(r"traceback is in (\S+\.log)", lines[0]).group(1))
    try:
        assert "Traceback" in log.read_text() and "second line" in log.read_text()
    finally:
        log.unlink()
