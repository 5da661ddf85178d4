"""Every stage that runs a model takes the same placement options (--dtype, --device,
--max-memory, --offload-folder) and hands them to the one loader
(``runtime.session.load_placed``): checked here at the loader's door, where transformers is
asked for the model, for each command; then verify, which now has them, run for real in
bfloat16 and spread by accelerate."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
import transformers
from typer.testing import CliRunner

from orthoedit.cli import app
from orthoedit.organism import CHAT_MODEL

runner = CliRunner()


class _Loaded(Exception):
    """Raised by the stand-in loader: the command got as far as loading a model."""


def _commands(run, tmp):
    """Each model-running command with inputs good enough to reach its first model load."""
    direction = str(run / "direction" / "direction.safetensors")
    chat, edited = str(CHAT_MODEL), str(run / "model")
    return {
        "measure": ["measure", chat, "--out", str(tmp / "m")],
        "search": ["search", chat, "--candidates", str(run / "direction"), "--out", str(tmp / "s")],
        "verify": ["verify", chat, edited],
        "compare": ["compare", chat, edited, "--report", str(tmp / "c.md")],
        "eval kl": ["eval", "kl", chat, edited],
        "eval safety": ["eval", "safety", edited, "--out", str(tmp / "e")],
        "study sites": ["study", "sites", chat, "--direction", direction, "--out", str(tmp / "x")],
        "attribute": ["attribute", chat, "--direction", direction, "--out", str(tmp / "a")],
    }


PLACED = ["--dtype", "bfloat16", "--device", "auto", "--max-memory", "cpu=3GiB"]


STAGES = ["measure", "search", "verify", "compare", "eval kl", "eval safety", "study sites"]


@pytest.mark.parametrize("name", [*STAGES, "attribute"])
def test_placement_options_reach_the_loader(name, organism_run, tmp_path, monkeypatch):
    seen = []

    def fake(folder, *args, **kwargs):
        seen.append(kwargs)
        raise _Loaded(str(folder))

    # every stage loads the class config.json names (runtime.session.model_class)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(
        lambda cls, folder, *args, **kwargs: fake(folder, *args, **kwargs)))  # fmt: skip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the CLI's traceback log
    offload = tmp_path / "offload"
    args = _commands(organism_run, tmp_path)[name] + PLACED + ["--offload-folder", str(offload)]
    result = runner.invoke(app, args)
    assert seen, result.output  # the CLI reports the stand-in's exception as a bug and exits 1
    assert seen[0]["dtype"] is torch.bfloat16 and seen[0]["device_map"] == "auto"
    assert seen[0]["max_memory"] == {"cpu": "3GiB"}
    assert seen[0]["offload_folder"] == str(offload)


@pytest.mark.parametrize("name", ["verify", "eval kl", "compare", "attribute"])
def test_spread_options_without_a_device_map_are_refused(name, organism_run, tmp_path):
    args = _commands(organism_run, tmp_path)[name] + ["--max-memory", "cpu=3GiB"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "need --device auto" in result.output


def test_verify_in_bfloat16_spread_by_accelerate(organism_run, tmp_path):
    """verify with the models in bfloat16, placed by device_map auto: it still passes, at the
    bfloat16 tolerances (a float32 checkpoint, checked in bfloat16 arithmetic), and says so."""
    report = tmp_path / "verify.json"
    args = ["verify", str(CHAT_MODEL), str(organism_run / "model"), "--report", str(report)]
    result = runner.invoke(app, [*args, "--dtype", "bfloat16", "--device", "auto"])
    assert result.exit_code == 0, result.output
    found = json.loads(report.read_text())
    assert found["passed"] and found["compute_dtype"] == "bfloat16"
    assert found["storage_dtype"] == "F32"
    assert found["tolerance"]["max_logit_diff"] == pytest.approx(5e-2)  # BF16's, not F32's
    exact = json.loads((organism_run / "verify.json").read_text())
    assert exact["compute_dtype"] == "float32" and exact["tolerance"]["max_logit_diff"] == 1e-4
