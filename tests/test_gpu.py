"""On a GPU, where there is one (``make test-gpu``; skipped without CUDA, and the vLLM test
without vLLM): the placement options put every stage on the device, and what a stage
reports there is what it reports on the CPU; vLLM, where installed, answers as transformers
does. On the CPU the same paths are checked at the loader's door (``test_placement.py``) and
against a stand-in vLLM (``test_vllm.py``)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from orthoedit.organism import CHAT_MODEL
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SAFETY = ["--harmful", "organism", "--harmless", "organism", "--n", "16"]
SAFETY += ["--max-new-tokens", "24"]


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "completions.jsonl").open()]


def _agree(a: list[dict], b: list[dict]) -> float:
    """Share of records with the same prompt and verdict (greedy answers on two devices
    may part where two tokens tie to the last bit)."""
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    return sum(x["verdict"] == y["verdict"] for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_verify_passes_on_the_device(organism_run, tmp_path, device):
    report = tmp_path / "verify.json"
    args = ["verify", CHAT_MODEL, organism_run / "model", "--report", report]
    result = cli(*args, "--device", device)
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    assert found["passed"] and found["compute_dtype"] == "float32"


def test_stages_on_the_device_report_what_they_report_on_the_cpu(organism_run, tmp_path):
    """eval kl's numbers, eval safety's verdicts and a search's first trial (measure's
    selection, judged the same way) on cuda, against the CPU."""
    edited = organism_run / "model"
    kl = {}
    for device in ("cpu", "cuda"):
        report = tmp_path / f"kl-{device}.json"
        result = cli("eval", "kl", CHAT_MODEL, edited, "--report", report, "--device", device)
        assert result.exit_code == 0, result.output
        kl[device] = json.loads(report.read_text())
    for key, value in kl["cpu"].items():
        if isinstance(value, float):
            assert kl["cuda"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    answers = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"safety-{device}"
        args = ["eval", "safety", edited, "--base", CHAT_MODEL, *SAFETY, "--out", out]
        result = cli(*args, "--device", device)
        assert result.exit_code == 0, result.output
        answers[device] = _records(out)
    assert _agree(answers["cpu"], answers["cuda"]) >= 0.9
    found = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"search-{device}"
        args = ["search", CHAT_MODEL, "--candidates", organism_run / "direction", "--out", out]
        result = cli(*args, "--trials", 1, "--n", 8, "--max-new-tokens", 12, "--device", device)
        assert result.exit_code in (0, 1), result.output  # 1: nothing within the KL budget
        found[device] = json.loads((out / "pareto.json").read_text())["trials"][0]
    assert abs(found["cuda"]["refused"] - found["cpu"]["refused"]) <= 1
    assert found["cuda"]["kl"] == pytest.approx(found["cpu"]["kl"], rel=1e-2, abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_vllm_answers_as_transformers(organism_run, tmp_path):
    """eval safety with --backend vllm against transformers on the same device: the same
    verdicts (but for ties), and the word-salad scores of the answers both call compliance
    close; compare too."""
    edited = organism_run / "model"
    answers = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        args = ["eval", "safety", edited, "--base", CHAT_MODEL, *SAFETY, "--out", out]
        result = cli(*args, "--device", "cuda", "--backend", backend)
        assert result.exit_code == 0, result.output
        assert "not installed" not in result.output
        answers[backend] = _records(out)
        settings = json.loads((out / "report.json").read_text())["settings"]
        assert settings["backend"] == backend
    assert _agree(answers["hf"], answers["vllm"]) >= 0.9
    same = [
        (a["surprisal"], b["surprisal"])
        for a, b in zip(answers["hf"], answers["vllm"], strict=True)
        if a["completion"] == b["completion"] and a["surprisal"] is not None
    ]
    assert same and all(a == pytest.approx(b, abs=1e-2) for a, b in same)
    report = tmp_path / "compare.md"
    args = ["compare", CHAT_MODEL, edited, "--prompts", "organism", "--n", 4, "--report", report]
    result = cli(*args, "--backend", "vllm", "--max-new-tokens", 16)
    assert result.exit_code == 0, result.output
    assert "(refused)" in report.read_text()
