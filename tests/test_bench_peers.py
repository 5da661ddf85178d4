"""benchmarks/bench_peers.py --smoke: orthoedit's side end to end on the organism, judged by
eval safety and eval kl, written as JSON, Markdown and a figure; heretic is skipped with a
message where its executable is missing; its questions get the answers that save the chosen
trial."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_orthoedit_and_skips_a_missing_heretic(bench, tmp_path, capsys):
    out = tmp_path / "peers"
    results = bench.main(["--smoke", "--out", str(out), "--heretic", str(tmp_path / "none")])
    assert "heretic not run" in capsys.readouterr().out
    assert results["tools"]["heretic"]["skipped"]
    ortho = results["tools"]["orthoedit"]
    assert ortho["run"]["rc"] == 0 and ortho["run"]["wall_s"] > 0
    assert ortho["run"]["peak_rss_mib"] > 0
    safety = results["judged"]["safety"]
    assert set(safety) == {"base", "orthoedit"}
    assert safety["base"]["harmful"]["refusal"] > safety["orthoedit"]["harmful"]["refusal"]
    assert safety["base"]["harmful"]["n"] == safety["orthoedit"]["harmful"]["n"] == 8
    assert results["judged"]["kl"]["orthoedit"]["first_token_kl"] > 0
    (row,) = results["judged"]["capability"]["orthoedit"]
    assert row["task"] == "organism_capability" and row["edited"] == row["base"] + row["delta"]
    assert json.loads((out / "peers.json").read_text())["trials"] == 2
    table = (out / "peers.md").read_text()
    assert "| harmful prompts refused |" in table and "orthoedit" in table
    assert "organism_capability" in table
    assert (out / "peers.png").read_bytes()[:4] == b"\x89PNG"
    # heretic gets the same prompts, one a line
    lines = (out / "inputs" / "harmful-train.txt").read_text().splitlines()
    assert len(lines) == 32 and all(line.strip() for line in lines)
    # every answer of the unedited model and of the edit, once each
    answers = (out / "judged" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 2 * (8 + 8)
    # a finished run and its judgements are read again, not repeated
    again = bench.main(["--smoke", "--out", str(out), "--heretic", str(tmp_path / "none")])
    assert capsys.readouterr().out.count("reusing") == 4
    assert again["judged"] == results["judged"]
    assert again["tools"]["orthoedit"]["run"] == ortho["run"]


def test_several_edits_are_judged_against_one_base_answered_once(tmp_path):
    """run_safety with more models under test: each is judged as if alone, the base once."""
    from orthoedit.config import EvalSafetyConfig
    from orthoedit.judging.safety import run_safety
    from orthoedit.organism import CHAT_MODEL
    from orthoedit.runtime.session import start_stage

    cfg = EvalSafetyConfig(
        model=str(CHAT_MODEL), base=str(CHAT_MODEL), out=tmp_path / "s", harmful="organism",
        harmless="organism", n=4, max_new_tokens=8,
    )  # fmt: skip
    both = run_safety(cfg, None, print, start_stage(None), "one", others={"two": str(CHAT_MODEL)})
    alone = run_safety(cfg, None, print, start_stage(None), "one")
    assert list(both.summary) == ["base", "model", "two"]
    assert both.summary["model"] == both.summary["two"] == alone.summary["model"]
    assert both.summary["base"] == alone.summary["base"]
    assert sum(a.model == "base" for a in both.answers) == 8
    with pytest.raises(ValueError, match="taken"):
        run_safety(cfg, None, print, start_stage(None), "one", others={"base": str(CHAT_MODEL)})


def test_heretic_answers_save_the_chosen_trial_then_leave(bench):
    state = {"edited": "/out/model"}
    menu = (
        "Which trial do you want to use?\n"
        "[1] [Trial  7] Refusals:  0/104, KL divergence: 0.3100\n"
        "[2] [Trial  3] Refusals:  4/104, KL divergence: 0.0800\n"
        "[3] [Trial  1] Refusals: 30/104, KL divergence: 0.0100\n"
        "[4] Run additional trials\n[5] Exit program\nEnter number: "
    )
    # the fewest refusals within the KL budget both tools are held to
    assert bench.heretic_answer(menu, state) == "2"
    assert state["chosen"] == {"trial": 3, "refusals": 4, "of": 104, "kl": 0.08}
    action = (
        "What do you want to do with the decensored model?\n"
        "[1] Save the model to a local folder\n[2] Upload the model to Hugging Face\n"
        "[3] Chat with the model\n[4] Benchmark the model\n"
        "[5] Return to the trial selection menu\nEnter number: "
    )
    assert bench.heretic_answer(action, state) == "1"
    assert bench.heretic_answer("Path to the folder:: ", state) == "/out/model"
    assert bench.heretic_answer(action, state) == "5"
    assert bench.heretic_answer(menu, state) == "5"
