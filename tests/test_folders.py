"""One reader and writer per folder (``orthoedit/folders.py``): the file names of the measure,
search, run and report folders are spelled there and nowhere else in the package, and the
parts of their formats kept there read back what they write."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import numpy as np
import pytest

from orthoedit.errors import BadInputError
from orthoedit.folders import KINDS, MeasureFolder, ReportFolder, RunFolder, SearchFolder

SRC = Path(__file__).resolve().parents[1] / "src" / "orthoedit"
HOME = SRC / "folders.py"
#: A subfolder name that another folder shares: ``export gguf`` writes ``MODEL_DIR/gguf``, its
#: own folder with its own reader (``export/gguf.py``).
SHARED = {"gguf"}


def _paths(folder, root: Path) -> list[Path]:
    """Every path a folder type names, its subfolders' too."""
    found = []
    for name in dir(type(folder)):
        if not isinstance(getattr(type(folder), name), property):
            continue
        value = getattr(folder, name)
        if isinstance(value, Path):
            found.append(value)
        elif hasattr(value, "path"):
            found += [value.path, *_paths(value, root)]
    if isinstance(folder, MeasureFolder):
        found += [folder.validation(kind) for kind in KINDS]
    return found


def folder_names() -> tuple[set[str], set[str]]:
    """(file names, subfolder names) of every folder type."""
    root = Path("/ROOT")
    paths = [
        *_paths(RunFolder(root), root),
        *_paths(MeasureFolder(root), root),
        *_paths(SearchFolder(root), root),
        *_paths(ReportFolder(root), root),
    ]
    names = {p.name for p in paths if p != root}
    files = {n for n in names if "." in n}
    return files, names - files - SHARED


def _text(node: ast.AST) -> str | None:
    """A string constant, or an f-string with ``{}`` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _names_file(part: str, files: set[str]) -> bool:
    if part in files:
        return True
    # a name made of literals and placeholders (``f"val-{kind}.jsonl"``) names those it fits
    literal = part.replace("{}", "")
    if "{}" not in part or not part[:1].isalnum() or "." not in literal:
        return False
    return any(fnmatch.fnmatchcase(name, part.replace("{}", "*")) for name in files)


def _path_parts(node: ast.AST) -> list[str]:
    """The path components a string spells: all of a string without spaces (a sentence is a
    message, not a path), and in an f-string message, what follows a placeholder and a slash
    (``f"see {out}/pareto.md"``)."""
    text = _text(node)
    if text is None:
        return []
    if not any(c.isspace() for c in text):
        return text.split("/")
    if not isinstance(node, ast.JoinedStr):
        return []
    paths = re.findall(r"\{\}/([^\s,;:()]+)", text)
    return [part.rstrip(".") for path in paths for part in path.split("/")]


def spelled_outside(roots: list[Path], files: set[str], folders: set[str]) -> list[str]:
    """``file:line: name`` for each path of a folder spelled outside its module: a string
    naming one of ``files`` as a path component (``_path_parts``), or ``x / "name"`` with one
    of ``folders``."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if path == HOME:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            parts = {
                id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values
            }
            for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
                if id(node) in parts:  # read with its f-string
                    continue
                hits = [p for p in _path_parts(node) if _names_file(p, files)]
                found += [f"{path.name}:{node.lineno}: {h}" for h in hits]
                if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                    right = _text(node.right)
                    if right in folders:
                        found.append(f"{path.name}:{node.lineno}: / {right!r}")
    return found


def test_the_folders_name_their_files():
    files, folders = folder_names()
    assert {"candidates.safetensors", "val-harmful.jsonl", "study.db", "run.json"} <= files
    assert {"direction", "search", "model", "eval", "chosen", "confirm"} <= folders


def test_no_folder_path_is_spelled_outside_its_module():
    files, folders = folder_names()
    assert spelled_outside([SRC], files, folders) == []


def test_the_spelling_check_sees_a_stray_name(tmp_path):
    (tmp_path / "stage.py").write_text(
        "def f(out, kind):\n"
        '    a = out / "candidates.safetensors"\n'
        '    b = out / f"val-{kind}.jsonl"\n'
        '    c = out / "eval" / "kl.json"\n'
        '    d = f"{out}/chosen/scales.json"\n'
        '    e = out / "model"\n'
        '    f = f"see {out}/pareto.md, then"\n'
        '    ok = ("a sentence about scores.json", f"{kind}.json", f"direction{kind}")\n'
        '    ok2 = (f"is scores.json there in {out}?", out / "lm_eval")\n'
    )
    files, folders = folder_names()
    found = spelled_outside([tmp_path], files, folders)
    assert sorted(line.split(": ", 1)[1] for line in found) == [
        "/ 'eval'",
        "/ 'model'",
        "candidates.safetensors",
        "kl.json",
        "pareto.md",
        "scales.json",
        "val-{}.jsonl",
    ]


def test_measure_folder_reads_what_it_writes(tmp_path):
    folder = MeasureFolder(tmp_path)
    rng = np.random.default_rng(0)
    harmful, harmless = rng.normal(size=(2, 4, 3, 8))
    folder.write_candidates(harmful - harmless, harmful, harmless)
    found = folder.read_candidates(d_model=8, n_layers=4)
    assert found.dtype == np.float64
    np.testing.assert_array_equal(found, (harmful - harmless).astype(np.float32))
    mean = folder.read_harmless_mean(layer=2, position=-1, d_model=8)
    np.testing.assert_array_equal(mean, harmless[2, 2].astype(np.float32))
    with pytest.raises(BadInputError, match="do not fit"):
        folder.read_candidates(d_model=8, n_layers=5)
    assert folder.read_record() is None
    folder.write_record({"layer": 2})
    assert folder.read_record() == {"layer": 2}
    folder.write_validation("harmful", ['say "hi"', "two\nlines"])
    from orthoedit.prompts import prompt_texts

    assert prompt_texts(folder.validation("harmful")) == ['say "hi"', "two\nlines"]
    assert folder.missing() == ["direction.safetensors", "val-harmless.jsonl"]


def test_run_folder_places_each_stage(tmp_path):
    run = RunFolder(tmp_path)
    assert run.output("direction") == run.direction.path
    assert run.output("search") == run.search.path
    assert run.relative(run.bench.json) == "eval/bench/report.json"
    assert run.search.chosen.direction.parent == run.search.path / "chosen"
