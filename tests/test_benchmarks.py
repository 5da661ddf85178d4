"""Every script in benchmarks/ runs in its smoke mode (``--smoke``: the model organism or tiny
models, the script's own code on a small input, seconds), as a user runs it: its own process,
its output in a temporary folder, exit 0 and an output of the expected shape. A broken import,
a moved name or a changed signature in the package then fails here rather than in the next
manual run. The full runs, and their tables in benchmarks/README.md, stay manual."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: Helpers that a benchmark runs in its own processes (its smoke run runs them too).
HELPERS = {"byte_copy.py": "bench_apply.py", "full_load.py": "bench_apply.py"}
#: Benchmarks whose smoke run has a test file of its own (its runs and its peer's answers).
ELSEWHERE = {"bench_peers.py": "test_bench_peers.py"}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, f"{script} --smoke: exit {done.returncode}\n{done.stderr[-4000:]}"
    return done


def _results(script: str, tmp_path: Path, *args: str) -> dict:
    results = tmp_path / "results.json"
    _run(script, "--work", tmp_path / "work", "--results", results, *args)
    return json.loads(results.read_text())


def check_attribute_precision(tmp_path):
    run = tmp_path / "run"
    _run("attribute_precision.py", run)
    found = json.loads((run / "precision-float32.json").read_text())
    assert found["dtype"] == "float32" and 0 < len(found["components"]) <= 4
    assert set(found["median_ratio"]) == {"run", "now"}


def check_bench_apply(tmp_path):
    found = _results("bench_apply.py", tmp_path)
    (size,) = found["sizes"]
    assert set(size["median"]) == {"copy", "apply", "full"}  # byte_copy.py and full_load.py
    assert size["shards"] >= 3 and size["apply_vs_full_check"]
    assert "| size |" in found["markdown"]


def check_bench_budget(tmp_path):
    out = _run("bench_budget.py").stdout
    assert "|---" in out and "| 16 |" in out  # budgets 4, 8, 16


def check_bench_device(tmp_path):
    found = _results("bench_device.py", tmp_path)
    assert [r["exit"] for r in found["runs"]] == [0] * len(found["runs"])
    assert {"measure cuda-f32 vs cpu-f32", "eval kl"} <= set(found["checks"])
    assert found["checks"]["eval kl"]["max_abs_diff"] <= found["checks"]["eval kl"]["tolerance"]


def check_bench_export(tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sentencepiece")
    found = _results("bench_export.py", tmp_path)
    f32 = found["results"]["F32"]
    assert f32["bytes"] > 0 and f32["hf"]["max_dlogit"] < 1e-4
    assert f32["llama.cpp"]["argmax_agree"] > 0.9


def check_bench_generate(tmp_path):
    results = tmp_path / "results.json"
    _run("bench_generate.py", "--results", results)
    found = json.loads(results.read_text())
    assert found["prompts"] == 8 and found["identical_answers"] == 8
    assert set(found["seconds"]) == {"batched", "single", "judge_batched", "judge_single"}


def check_bench_gguf(tmp_path):
    found = _results("bench_gguf.py", tmp_path)
    assert found["file"]["layers"] == 2 and set(found["median_s"]) == {"copy", "apply"}


def check_bench_headroom(tmp_path):
    found = _results("bench_headroom.py", tmp_path)
    searched = found["orthoedit search on the test split"]
    assert searched["trials"] == 2 and "acceptance" in searched
    assert found["free writer weights on the test split"]["trials"] == 2


def check_bench_measure(tmp_path):
    found = _results("bench_measure.py", tmp_path)
    assert [r["exit_code"] for r in found["end_to_end"].values()] == [0]
    assert found["in_process"]["train_prompts"] == 32
    assert found["half_b_generation"]["prompts"] == 8


def check_bench_recipe(tmp_path):
    found = _results("bench_recipe.py", tmp_path)
    assert found["failed"] is None
    assert set(found["stages_s"]) == {"direction", "model", "verify", "kl"}
    assert found["direction"]["layer"] == 2 and found["kl"]["first_token_kl"] >= 0


def check_bench_search(tmp_path):
    found = _results("bench_search.py", tmp_path)
    organism = found["organism"]
    assert organism["trials"] == 2 and organism["validation"]["chosen"] is not None
    assert set(organism["test"]) >= {"unedited", "measure"} and "acceptance" in organism


CHECKS = {name[len("check_") :] + ".py": f for name, f in globals().items() if name[:6] == "check_"}


def test_every_benchmark_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(CHECKS) | set(HELPERS) | set(ELSEWHERE)
    assert set(HELPERS.values()) <= set(CHECKS)
    assert all((ROOT / "tests" / test).is_file() for test in ELSEWHERE.values())


@pytest.mark.parametrize("script", sorted(CHECKS))
def test_benchmark_smoke(script, tmp_path):
    CHECKS[script](tmp_path)
