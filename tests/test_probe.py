"""The bad-input probe: bad inputs across every command, each held to the same rules.

For every case: exit 2; one line on stderr, ``error: ...``, naming the option or the file at
fault; no Python traceback; nothing at the output path; the source model byte-identical; no
staging folder left anywhere in the workspace. Usage errors (an unknown option, a value not
among the choices, a missing argument) are held to the same rules as orthoedit's own checks.
Every case fails before a model is loaded, so the whole probe takes seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import folder_digest
from orthoedit.cli import app

runner = CliRunner()

# (name, command line with placeholders, words the error line must contain). Placeholders:
# {M} the source model (a private copy, checked byte-identical afterwards), {D} a direction
# file, {O} an output folder, {F} an output file, {W} the workspace, {P} a good prompt file,
# {BIN} a binary .jsonl, {EMPTY} an empty .jsonl, {NOCOL} a .jsonl without a prompt column,
# {C} a folder that is no measure output, {E} a folder that is no edited checkpoint,
# {R} a recipe, {BADR} a recipe with an unknown key, {S} a scales file with bad JSON.
CASES = [
    # apply
    (
        "apply: missing direction",
        "apply {M} --direction {W}/none.safetensors --out {O}",
        ["none.safetensors"],
    ),
    ("apply: missing model", "apply {W}/nomodel --direction {D} --out {O}", ["nomodel"]),
    ("apply: empty --sites", "apply {M} --direction {D} --out {O} --sites ''", ["--sites"]),
    (
        "apply: unknown site",
        "apply {M} --direction {D} --out {O} --sites embed,nose",
        ["--sites", "nose"],
    ),
    (
        "apply: layers past the model",
        "apply {M} --direction {D} --out {O} --layers 2:99",
        ["--layers"],
    ),
    ("apply: layers not a range", "apply {M} --direction {D} --out {O} --layers abc", ["--layers"]),
    (
        "apply: missing scales",
        "apply {M} --direction {D} --out {O} --scales {W}/none.json",
        ["none.json"],
    ),
    (
        "apply: scales not JSON",
        "apply {M} --direction {D} --out {O} --scales {S}",
        ["bad-scales.json"],
    ),
    ("apply: direction not a tensor file", "apply {M} --direction {BIN} --out {O}", ["bin.jsonl"]),
    ("apply: out is the source", "apply {M} --direction {D} --out {M} --overwrite", ["--out"]),
    (
        "apply: out is a foreign folder",
        "apply {M} --direction {D} --out {W}/notes --overwrite",
        ["--out", "notes"],
    ),
    (
        "apply: out is the working folder",
        "apply {M} --direction {D} --out . --overwrite",
        ["--out"],
    ),
    (
        "apply: unknown method",
        "apply {M} --direction {D} --out {O} --method sideways",
        ["--method", "sideways"],
    ),
    (
        "apply: unknown tied policy",
        "apply {M} --direction {D} --out {O} --tied glue",
        ["--tied", "glue"],
    ),
    (
        "apply: row of a single direction",
        "apply {M} --direction {D} --out {O} --direction-layer 3",
        ["--direction-layer"],
    ),
    ("apply: unknown option", "apply {M} --direction {D} --out {O} --n-train 2", ["--n-train"]),
    ("apply: no --direction", "apply {M} --out {O}", ["--direction"]),
    # verify
    ("verify: missing edited folder", "verify {M} {W}/noedit", ["noedit"]),
    ("verify: folder without a plan", "verify {M} {E}", ["plan.json"]),
    ("verify: zero prompts", "verify {M} {E} --max-prompts 0", ["--max-prompts"]),
    (
        "verify: report over an input",
        "verify {M} {E} --report {M}/config.json --overwrite",
        ["--report"],
    ),
    # measure
    ("measure: missing model", "measure {W}/nomodel --out {O}", ["nomodel"]),
    (
        "measure: missing harmful file",
        "measure {M} --out {O} --harmful {W}/none.jsonl",
        ["none.jsonl"],
    ),
    ("measure: binary prompts", "measure {M} --out {O} --harmful {BIN}", ["bin.jsonl", "UTF-8"]),
    ("measure: empty prompts", "measure {M} --out {O} --harmless {EMPTY}", ["empty.jsonl"]),
    (
        "measure: no prompt column",
        "measure {M} --out {O} --harmful {NOCOL}",
        ["nocol.jsonl", "--column"],
    ),
    ("measure: n-train below 2", "measure {M} --out {O} --n-train 1", ["--n-train"]),
    ("measure: n-val below 2", "measure {M} --out {O} --n-val 0", ["--n-val"]),
    ("measure: negative max-kl", "measure {M} --out {O} --max-kl -1", ["--max-kl"]),
    (
        "measure: missing template",
        "measure {M} --out {O} --template {W}/none.jinja",
        ["none.jinja"],
    ),
    ("measure: bogus device", "measure {M} --out {O} --device bogus", ["--device"]),
    ("measure: device this machine lacks", "measure {M} --out {O} --device cuda:7", ["--device"]),
    ("measure: unknown dtype", "measure {M} --out {O} --dtype float8", ["--dtype", "float8"]),
    ("measure: out is the model", "measure {M} --out {M} --overwrite", ["--out"]),
    ("measure: zero batch", "measure {M} --out {O} --batch-size 0", ["--batch-size"]),
    # search
    ("search: no measure folder", "search {M} --candidates {W}/nomeasure --out {O}", ["nomeasure"]),
    (
        "search: folder that is no measure output",
        "search {M} --candidates {C} --out {O}",
        ["candidates"],
    ),
    ("search: zero trials", "search {M} --candidates {C} --out {O} --trials 0", ["--trials"]),
    (
        "search: failure rate above 1",
        "search {M} --candidates {C} --out {O} --max-failure 2",
        ["--max-failure"],
    ),
    (
        "search: positions not negative",
        "search {M} --candidates {C} --out {O} --positions 0",
        ["--positions"],
    ),
    (
        "search: reversed layer range",
        "search {M} --candidates {C} --out {O} --direction-layers 3:2",
        ["--direction-layers"],
    ),
    (
        "search: budget objective without a target",
        "search {M} --candidates {C} --out {O} --objective budget",
        ["--max-failure"],
    ),
    (
        "search: max-drop without a task",
        "search {M} --candidates {C} --out {O} --max-drop 0.1",
        ["--eval-task"],
    ),
    (
        "search: unknown profile",
        "search {M} --candidates {C} --out {O} --profile wavy",
        ["--profile", "wavy"],
    ),
    ("search: out is the model", "search {M} --candidates {C} --out {M} --overwrite", ["--out"]),
    # eval bench
    ("eval bench: missing base", "eval bench {W}/nobase {M} --out {O}", ["nobase"]),
    ("eval bench: missing edited", "eval bench {M} {W}/noedit --out {O}", ["noedit"]),
    (
        "eval bench: unknown backend",
        "eval bench {M} {M} --out {O} --backend tpu",
        ["--backend", "tpu"],
    ),
    ("eval bench: bad threshold", "eval bench {M} {M} --out {O} --max-drop-task mmlu", ["mmlu"]),
    ("eval bench: out is the model", "eval bench {M} {M} --out {M} --overwrite", ["--out"]),
    # eval kl
    ("eval kl: missing prompts", "eval kl {M} {M} --prompts {W}/none.jsonl", ["none.jsonl"]),
    ("eval kl: binary prompts", "eval kl {M} {M} --prompts {BIN}", ["bin.jsonl"]),
    ("eval kl: zero prompts", "eval kl {M} {M} --n 0", ["--n"]),
    (
        "eval kl: report over the model",
        "eval kl {M} {M} --report {M}/config.json --overwrite",
        ["--report"],
    ),
    ("eval kl: device this machine lacks", "eval kl {M} {M} --device cuda:7", ["--device"]),
    # eval safety
    ("eval safety: missing model", "eval safety {W}/nomodel --out {O}", ["nomodel"]),
    (
        "eval safety: missing harmful",
        "eval safety {M} --out {O} --harmful {W}/none.jsonl",
        ["none.jsonl"],
    ),
    ("eval safety: out is the model", "eval safety {M} --out {M} --overwrite", ["--out"]),
    ("eval safety: out inside the model", "eval safety {M} --out {M}/report", ["--out"]),
    (
        "eval safety: surprisal without a base",
        "eval safety {M} --out {O} --max-surprisal 3",
        ["--max-surprisal", "--base"],
    ),
    ("eval safety: bad judge", "eval safety {M} --out {O} --judge oracle:x", ["--judge"]),
    # compare
    ("compare: missing edited", "compare {M} {W}/noedit --report {F}", ["noedit"]),
    (
        "compare: no prompt column",
        "compare {M} {M} --prompts {NOCOL} --report {F}",
        ["nocol.jsonl", "--column"],
    ),
    ("compare: zero prompts", "compare {M} {M} --n 0 --report {F}", ["--n"]),
    (
        "compare: report over the model",
        "compare {M} {M} --report {M}/config.json --overwrite",
        ["--report"],
    ),
    # study sites, attribute
    (
        "study sites: missing direction",
        "study sites {M} --direction {W}/none.safetensors --out {O}",
        ["none.safetensors"],
    ),
    (
        "study sites: out is the model",
        "study sites {M} --direction {D} --out {M} --overwrite",
        ["--out"],
    ),
    (
        "attribute: missing direction",
        "attribute {M} --direction {W}/none.safetensors --out {O}",
        ["none.safetensors"],
    ),
    (
        "attribute: missing harmless",
        "attribute {M} --direction {D} --out {O} --harmless {W}/none.csv",
        ["none.csv"],
    ),
    # run, push
    ("run: missing recipe", "run {W}/none.yaml --out {O}", ["none.yaml"]),
    ("run: unknown recipe key", "run {BADR} --out {O}", ["bad.yaml", "colour"]),
    ("run: unknown stage", "run {R} --out {O} --from polish", ["--from", "polish"]),
    ("run: stage the recipe lacks", "run {R} --out {O} --only bench", ["--only", "bench"]),
    ("push: missing folder", "push {W}/nomodel me/model", ["nomodel"]),
    ("push: not an edited checkpoint", "push {E} me/model", ["plan.json"]),
    ("push: bad repo id", "push {E} 'not a repo id'", ["not a repo id"]),
    # an existing output, without --overwrite: reported before any model loads
    ("apply: out exists", "apply {M} --direction {D} --out {W}/notes", ["--out", "exists"]),
    ("measure: out exists", "measure {M} --out {W}/notes", ["--out", "exists"]),
    ("search: out exists", "search {M} --candidates {C} --out {W}/notes", ["--out", "notes"]),
    ("eval safety: out exists", "eval safety {M} --out {W}/notes", ["--out", "exists"]),
    ("eval bench: out exists", "eval bench {M} {M} --out {W}/notes", ["--out", "exists"]),
    (
        "study sites: out exists",
        "study sites {M} --direction {D} --out {W}/notes",
        ["--out", "exists"],
    ),
    ("attribute: out exists", "attribute {M} --direction {D} --out {W}/notes", ["--out", "exists"]),
    (
        "compare: report exists",
        "compare {M} {M} --report {W}/notes/todo.txt",
        ["--report", "exists"],
    ),
    (
        "eval kl: report exists",
        "eval kl {M} {M} --report {W}/notes/todo.txt",
        ["--report", "exists"],
    ),
    ("verify: report exists", "verify {M} {E} --report {W}/notes/todo.txt", ["--report"]),
]
OUTPUTS = ("{O}", "{F}")


@pytest.fixture
def workspace(tiny_model, direction_file, tmp_path, monkeypatch) -> dict[str, str]:
    ws = tmp_path / "ws"
    ws.mkdir()
    model = ws / "model"
    shutil.copytree(tiny_model("llama"), model)
    edited = ws / "edited"
    shutil.copytree(model, edited)
    (ws / "notes").mkdir()
    (ws / "notes" / "todo.txt").write_text("keep me\n")
    shutil.copy(direction_file, ws / "d.safetensors")
    (ws / "p.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "how are you?"}\n')
    (ws / "bin.jsonl").write_bytes(bytes(range(256)) * 4)
    (ws / "empty.jsonl").write_text("")
    (ws / "nocol.jsonl").write_text('{"text": "hello"}\n')
    (ws / "bad-scales.json").write_text("{attn: [1,")
    (ws / "candidates").mkdir()
    (ws / "recipe.yaml").write_text(f"model: {model}\nverify: null\n")
    (ws / "bad.yaml").write_text(f"model: {model}\ncolour: blue\n")
    monkeypatch.chdir(ws)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {
        "M": str(model),
        "D": str(ws / "d.safetensors"),
        "O": str(ws / "out"),
        "F": str(ws / "out.md"),
        "W": str(ws),
        "P": str(ws / "p.jsonl"),
        "BIN": str(ws / "bin.jsonl"),
        "EMPTY": str(ws / "empty.jsonl"),
        "NOCOL": str(ws / "nocol.jsonl"),
        "C": str(ws / "candidates"),
        "E": str(edited),
        "R": str(ws / "recipe.yaml"),
        "BADR": str(ws / "bad.yaml"),
        "S": str(ws / "bad-scales.json"),
    }


def test_the_probe_is_wide():
    assert len(CASES) >= 60
    commands = {
        line.split()[0] if line.split()[0] not in ("eval", "study") else " ".join(line.split()[:2])
        for _, line, _ in CASES
    }
    assert commands >= {
        "apply", "verify", "measure", "search", "eval bench", "eval kl", "eval safety",
        "compare", "study sites", "attribute", "run", "push",
    }  # fmt: skip


@pytest.mark.parametrize(("line", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(workspace, line, words):
    import shlex

    args = [a.format(**workspace) for a in shlex.split(line)]
    ws = Path(workspace["W"])
    before = {name: folder_digest(workspace[name]) for name in ("M", "E")}
    notes = folder_digest(ws / "notes")
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("error: "), lines[0]
    for word in words:
        assert word.format(**workspace) in lines[0], (word, lines[0])
    for placeholder in OUTPUTS:
        if placeholder in line:
            assert not Path(placeholder.format(**workspace)).exists()
    assert {name: folder_digest(workspace[name]) for name in ("M", "E")} == before
    assert folder_digest(ws / "notes") == notes
    staged = [p for p in ws.rglob("*") if ".orthoedit-" in p.name or ".old-" in p.name]
    assert not staged
