"""The Python API (``orthoedit.api``, docs/api.md): every stage as a function of its config,
importable without torch, each one the stage's own function; and examples/api.py, the
pipeline from Python on the organism, runs and its edit passes verify."""

from __future__ import annotations

import importlib
import inspect
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from orthoedit import api

ROOT = Path(__file__).resolve().parents[1]

#: Each API function and the stage function it calls.
STAGES = {
    "measure": "orthoedit.measure.candidates:measure",
    "search": "orthoedit.search.loop:search",
    "apply": "orthoedit.edit.apply:apply",
    "verify": "orthoedit.verify:verify",
    "eval_bench": "orthoedit.evaluate.bench:eval_bench",
    "eval_safety": "orthoedit.evaluate.safety:eval_safety",
    "eval_kl": "orthoedit.evaluate.kl:eval_kl",
    "compare": "orthoedit.evaluate.compare:compare",
    "study_sites": "orthoedit.research.sites:study_sites",
    "attribute": "orthoedit.research.attribute:attribute",
    "export_gguf": "orthoedit.export.gguf:export_gguf",
    "push": "orthoedit.publish:push",
    "run": "orthoedit.pipeline.run:run",
}


def test_every_stage_is_in_the_api_and_in_its_page():
    page = (ROOT / "docs" / "api.md").read_text()
    functions = [n for n in api.__all__ if n[0].islower()]
    assert sorted(functions) == sorted(STAGES)
    for name in api.__all__:
        assert hasattr(api, name), name
        assert f"`{name}" in page, f"docs/api.md does not mention {name}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_an_api_function_takes_what_its_stage_takes(name):
    module, attr = STAGES[name].split(":")
    stage = getattr(importlib.import_module(module), attr)
    ours = inspect.signature(getattr(api, name)).parameters
    theirs = inspect.signature(stage).parameters
    if name == "run":
        assert list(ours)[:2] == list(theirs)[:2]
        return
    assert set(ours) <= set(theirs), (name, set(ours) - set(theirs))
    for param in ours.values():
        assert param.default == theirs[param.name].default, (name, param.name)


def test_the_api_loads_no_torch():
    code = "import sys, orthoedit.api\nassert 'torch' not in sys.modules, 'torch loaded'\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_example_runs_the_pipeline_and_its_edit_passes_verify(tmp_path):
    """examples/api.py: measure, a 4-trial search, apply, verify on the organism."""
    example = runpy.run_path(str(ROOT / "examples" / "api.py"))
    report = example["main"](tmp_path)
    assert report.passed, report.failures
    # the edited checkpoint equals the plan applied at run time, to float32's tolerance
    assert report.max_logit_diff <= 1e-4 * max(1.0, report.max_abs_logit)
    assert report.mean_kl <= 1e-7
    assert report.unedited_identical and report.headers_identical
    assert (tmp_path / "search" / "pareto.json").is_file()
    assert (tmp_path / "edited" / "plan.json").is_file()
