"""Slow (``make test-slow``): interrupt ``orthoedit run`` at every stage, with SIGINT and with
SIGKILL, then run it again. The second run redoes only what had not finished, and the final
artifacts equal those of an uninterrupted run. The publish stage pushes to a local Hub
stand-in (tests/hubstub.py) that the subprocesses reach through HF_ENDPOINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sigint_as_on_a_terminal
from hubstub import FAKE_TOKEN, HubStub
from orthoedit.organism import CHAT_MODEL, GUARD_MODEL, PROMPTS
from orthoedit.pipeline.recipe import STAGES as ALL_STAGES

#: The micro recipe's stages: every one but search (which test_search interrupts itself).
STAGES = [s for s in ALL_STAGES if s != "search"]

pytestmark = pytest.mark.slow
ORTHOEDIT = Path(sys.executable).parent / "orthoedit"


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "micro.yaml"
    path.write_text(
        f"model: {CHAT_MODEL}\n"
        f"measure: {{harmful: {PROMPTS / 'harmful-train.jsonl'}, "
        f"harmless: {PROMPTS / 'harmless-train.jsonl'}, layer: 2, position: -1, "
        "refusal_tokens: sorry, n_train: 64, n_val: 8}\n"
        "verify: {}\n"
        "bench: {tasks: [organism_capability], limit: 40, dtype: float32, offline: true}\n"
        f"safety: {{harmful: organism, harmless: organism, n: 24, judge: 'hf:{GUARD_MODEL}'}}\n"
        f"kl: {{prompts: {PROMPTS / 'harmless-test.jsonl'}, n: 24, dtype: float32}}\n"
        "publish: {repo_id: acme/organism-orthoedit}\n"
    )
    return path


ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def hub(tmp_path_factory):
    """A Hub stand-in for the publish stage, reached by the subprocesses through the env."""
    stub = HubStub(token=FAKE_TOKEN).start()
    ENV.update(
        os.environ,
        HF_ENDPOINT=stub.endpoint,
        HF_TOKEN=FAKE_TOKEN,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path_factory.mktemp("hf_home")),
    )
    yield stub
    stub.stop()


def _run(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [ORTHOEDIT, "run", recipe, "--out", out],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )


def _artifacts(out: Path) -> dict:
    """What must not depend on interruptions (paths and timings aside)."""
    bench = json.loads((out / "eval" / "bench" / "report.json").read_text())
    safety = json.loads((out / "eval" / "safety" / "report.json").read_text())
    return {
        "direction": (out / "direction" / "direction.safetensors").read_bytes(),
        "candidates": (out / "direction" / "candidates.safetensors").read_bytes(),
        "shards": {p.name: p.read_bytes() for p in (out / "model").glob("*.safetensors")},
        "verify": json.loads((out / "verify.json").read_text())["passed"],
        "bench": [(r["task"], r["metric"], r["base"], r["edited"]) for r in bench["rows"]],
        "safety": safety["summary"],
        "published": {  # names, and sizes where no report records the run's own path
            k: None if k.startswith(("orthoedit/eval/", "orthoedit/verify")) else v
            for k, v in json.loads((out / "publish.json").read_text())["files"].items()
        },
    }


def _interrupt(recipe: Path, out: Path, stage: str, sig: int) -> set[str]:
    """Start a run, send ``sig`` once ``stage`` has started; the stages it had finished."""
    proc = subprocess.Popen(
        [ORTHOEDIT, "run", recipe, "--out", out],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=sigint_as_on_a_terminal,
    )
    for line in proc.stderr:
        if f"{stage}: running" in line:
            time.sleep(0.3)
            proc.send_signal(sig)
            break
    proc.communicate(timeout=600)
    state = out / "run.json"
    return set(json.loads(state.read_text())["stages"]) if state.exists() else set()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    recipe = _recipe(root)
    done = _run(recipe, root / "reference")
    assert done.returncode == 0, done.stderr
    return recipe, _artifacts(root / "reference")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("stage", STAGES)
def test_interrupt_and_resume(reference, tmp_path, stage, sig):
    recipe, expected = reference
    out = tmp_path / "run"
    finished = _interrupt(recipe, out, stage, sig)
    assert set(STAGES[: STAGES.index(stage)]) <= finished  # stages before it were kept
    resumed = _run(recipe, out)
    assert resumed.returncode == 0, resumed.stderr
    for name in STAGES:
        expected_line = f"{name}: up to date, skipped" if name in finished else f"{name}: running"
        assert expected_line in resumed.stderr, (name, finished, resumed.stderr[-2000:])
    assert _artifacts(out) == expected
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no leftovers
