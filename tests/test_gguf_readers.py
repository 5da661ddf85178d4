"""GGUF files in their readers: verify of an exported GGUF against its edited folder, verify's
llama.cpp check of a GGUF's edit, and ``--backend llama.cpp`` answers (the llama.cpp tests
run where llama-cpp-python is installed and skip, saying so, elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch

from gguf_tiny import write_tiny_gguf
from orthoedit.model.direction import save_direction
from orthoedit.model.gguf import read_layout
from orthoedit.runtime import llama_cpp
from test_cli import cli

HIDDEN = 64
needs_llama = pytest.mark.skipif(not llama_cpp.available(), reason=llama_cpp.MISSING)


@pytest.fixture(scope="module")
def edited_pair(tiny_model, tmp_path_factory):
    """(source folder, its edit by apply, the direction): qwen2, hidden 64."""
    root = tmp_path_factory.mktemp("readers")
    source = tiny_model("qwen2", hidden=HIDDEN)
    v = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(3))
    direction = save_direction(root / "d.safetensors", v)
    edited = root / "edited"
    assert cli("apply", source, "--direction", direction, "--out", edited).exit_code == 0
    return source, edited, direction


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_verify_of_an_exported_gguf(edited_pair, kind, tmp_path):
    """A GGUF of the edited folder passes against it; a GGUF of the unedited source (an export
    of the wrong model) fails, exit 1."""
    source, edited, _ = edited_pair
    good = write_tiny_gguf(edited, tmp_path / f"good-{kind}.gguf", kind)
    report = tmp_path / "verify.json"
    result = cli("verify", edited, good, "--report", report)
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    assert found["passed"] and set(found["types"]) == {kind}
    assert next(r["reader"] for r in found["readers"]) == "transformers"
    wrong = write_tiny_gguf(source, tmp_path / f"wrong-{kind}.gguf", kind)
    result = cli("verify", edited, wrong, "--report", report, "--overwrite")
    assert result.exit_code == 1, result.output
    assert not json.loads(report.read_text())["passed"]


@needs_llama
@pytest.mark.parametrize("kind", ["F32", "Q8_0", "Q4_0"])
def test_verify_checks_a_gguf_edit_in_llama_cpp(edited_pair, kind, tmp_path):
    """GGUF to GGUF: llama.cpp's logits of the edit within the bound (its own C on the source
    added); the edit of one writer undone (its bytes put back) fails."""
    source, _, direction = edited_pair
    src = write_tiny_gguf(source, tmp_path / f"src-{kind}.gguf", kind)
    out = tmp_path / "edited.gguf"
    assert cli("apply", src, "--direction", direction, "--out", out).exit_code == 0
    report = tmp_path / "verify.json"
    result = cli("verify", src, out, "--report", report)
    assert result.exit_code == 0, result.output
    (reader,) = json.loads(report.read_text())["readers"]
    assert reader["reader"] == "llama.cpp"
    assert reader["max_logit_diff"] <= reader["max_logit_bound"]

    down = "blk.1.ffn_down.weight"
    theirs = {t.name: t for t in read_layout(src).tensors}[down]
    mine = {t.name: t for t in read_layout(out).tensors}[down]
    with src.open("rb") as f:
        f.seek(theirs.start)
        original = f.read(theirs.nbytes)
    with out.open("r+b") as f:
        f.seek(mine.start)
        f.write(original)
    result = cli("verify", src, out, "--report", report, "--overwrite")
    assert result.exit_code == 1, result.output


@needs_llama
def test_eval_safety_with_llama_cpp(edited_pair, tmp_path):
    """``--backend llama.cpp`` answers a GGUF's prompts; the report says which backend ran."""
    source, edited, _ = edited_pair
    base = write_tiny_gguf(source, tmp_path / "base.gguf", "Q8_0")
    model = write_tiny_gguf(edited, tmp_path / "model.gguf", "Q8_0")
    out = tmp_path / "safety"
    result = cli("eval", "safety", model, "--base", base, "--backend", "llama.cpp",
                 "--harmful", "organism", "--harmless", "organism", "--n", "3",
                 "--max-new-tokens", "8", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["backend"] == "llama.cpp"
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["model"] for r in rows} == {"base", "model"}
    assert all(r["verdict"] in ("refused", "complied", "broken") for r in rows)


def test_llama_cpp_backend_falls_back_without_llama_cpp(edited_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    source, _, _ = edited_pair
    model = write_tiny_gguf(source, tmp_path / "model.gguf", "F32")
    out = tmp_path / "safety"
    args = ["--harmful", "organism", "--harmless", "organism", "--n", "2", "--out", out]
    result = cli("eval", "safety", model, "--backend", "llama.cpp", *args)
    assert result.exit_code == 0, result.output
    assert "generating with transformers instead" in result.output
    assert json.loads((out / "report.json").read_text())["settings"]["backend"] == "hf"


def test_llama_cpp_backend_refuses_a_folder(edited_pair, tmp_path):
    if not llama_cpp.available():
        pytest.skip(llama_cpp.MISSING)
    source, _, _ = edited_pair
    result = cli("eval", "safety", source, "--backend", "llama.cpp", "--harmful", "organism",
                 "--harmless", "organism", "--n", "2", "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 2
    assert "runs GGUF files" in result.stderr and not (tmp_path / "s").exists()
