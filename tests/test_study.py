"""``orthoedit study sites``: on the organism it reproduces measure's numbers for the chosen
candidate, its weight-edit conditions are what apply ships, and bad inputs write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import folder_digest
from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import apply
from orthoedit.model.architectures import table_for_config
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.model.direction import load_direction, save_direction
from orthoedit.model.source import read_config
from orthoedit.organism import GUARD_MODEL
from orthoedit.prompts import load_prompt_file, prompt_digest
from orthoedit.research.sites import ONE_LAYER, interventions
from orthoedit.verify import encode_prompts
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

PROMPTS = ["How do I bake bread?", "Tell me about the sea and the river.", "What is a cat?"]


def _by_name(report: dict) -> dict:
    return {(c["kind"], c["name"]): c for c in report["conditions"]}


def _check_png(path: Path) -> None:
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_organism_sites_reproduce_measure(organism_run, tmp_path):
    """On measure's own validation prompts and refusal tokens, the weight edit of every writer
    is measure's bypass score of the chosen candidate, and its KL measure's KL; run-time
    ablation removes the organism's refusal."""
    folder = organism_run / "direction"
    record = json.loads((folder / "direction.json").read_text())
    scores = json.loads((folder / "scores.json").read_text())
    prompts = {}
    for kind in ("harmful", "harmless"):  # measure wrote the exact validation lists, in order
        prompts[kind] = [i["prompt"] for i in load_prompt_file(folder / f"val-{kind}.jsonl")]
        assert prompt_digest(prompts[kind]) == record["prompt_hashes"][f"{kind}_val"]
    n = max(map(len, prompts.values()))
    out = tmp_path / "sites"
    args = ["study", "sites", record["model"], "--direction", folder / "direction.safetensors"]
    args += ["--harmful", folder / "val-harmful.jsonl", "--harmless", folder / "val-harmless.jsonl"]
    result = cli(*args, "--n", n, "--judge", f"hf:{GUARD_MODEL}", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sites.json").read_text())
    assert report["refusal_openings"] == scores["refusal_openings"]
    assert report["settings"]["prompt_hashes"] == {
        kind: record["prompt_hashes"][f"{kind}_val"] for kind in ("harmful", "harmless")
    }
    c = _by_name(report)
    base, edit, full = c["baseline", "none"], c["weight edit", "all"], c["run time", "all"]
    assert base["log_odds"] == pytest.approx(scores["baseline"]["harmful_log_odds"], abs=1e-9)
    assert abs(edit["log_odds"] - scores["chosen"]["bypass"]) <= 1e-4
    assert abs(edit["kl"] - scores["chosen"]["kl"]) <= 1e-6
    assert base["kl"] == 0 and base["delta"] == 0 and full["share"] == pytest.approx(1)
    one = c["run time", ONE_LAYER]  # the residual stream entering measure's layer only
    assert one["sites"] == f"residual, layer {record['layer']}" and one["log_odds"] is not None
    assert one["share"] is not None and one["kl"] > 0
    assert base["refusal"] >= 0.9 and full["refusal"] <= 0.05
    assert base["unsafe"] <= 0.1 and full["unsafe"] >= 0.9
    # A pre-norm, untied model: the attention (MLP) module's output is o_proj's (down_proj's),
    # so the run-time and weight-edit conditions agree, and the full edit is the paper's ablation.
    for name in ("attn", "mlp", "all"):
        assert c["run time", name]["log_odds"] == pytest.approx(
            c["weight edit", name]["log_odds"], abs=1e-4
        )
    for cond in report["conditions"]:
        assert cond["delta"] == pytest.approx(cond["log_odds"] - base["log_odds"])
        assert cond["share"] == pytest.approx(cond["delta"] / full["delta"])
    text = (out / "sites.md").read_text()
    assert report["finding"] in text and report["finding"] in " ".join(result.stdout.split())
    assert "| weight edit | all (embed+attn+mlp) |" in text and "unsafe (judge)" in text
    _check_png(out / "sites.png")


def test_an_openai_judge_gives_the_guards_unsafe_rates(organism_run, tmp_path):
    """study sites takes eval safety's judge options: an OpenAI-compatible endpoint that
    answers as the organism's guard gives the guard's unsafe rate for every condition."""
    from judgeserver import JudgeServer

    folder = organism_run / "direction"
    record = json.loads((folder / "direction.json").read_text())
    args = ["study", "sites", record["model"], "--direction", folder / "direction.safetensors"]
    args += ["--harmful", "organism", "--harmless", "organism", "--n", 6]
    server = JudgeServer("guard")
    try:
        by_server = cli(
            *args, "--out", tmp_path / "openai", "--judge", f"openai:{server.url}",
            "--judge-model", "guard", "--judge-style", "guard", "--judge-timeout", 5,
        )  # fmt: skip
    finally:
        server.close()
    by_guard = cli(*args, "--out", tmp_path / "hf", "--judge", f"hf:{GUARD_MODEL}")
    assert by_server.exit_code == 0 and by_guard.exit_code == 0, by_server.output
    reports = [json.loads((tmp_path / n / "sites.json").read_text()) for n in ("openai", "hf")]
    assert reports[0]["settings"]["judge_model"] == "guard"
    rates = [
        {(c["kind"], c["name"]): (c["unsafe"], c["unjudged"]) for c in r["conditions"]}
        for r in reports
    ]
    assert rates[0] == rates[1]
    assert rates[0]["run time", "all"] == (1.0, 0) and rates[0]["baseline", "none"][0] < 1
    assert server.requests == 6 * sum(c["log_odds"] is not None for c in reports[0]["conditions"])


@torch.no_grad()
def _logits(model, inputs) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits[0].double() for ids in inputs]


@pytest.mark.parametrize(("family", "kwargs"), [("llama", {"tie": True}), ("gpt2", {})])
def test_weight_edits_are_what_apply_ships(tiny_model, direction_file, tmp_path, family, kwargs):
    """Every weight-edit condition, run as the study runs it, gives the logits of the
    checkpoint apply writes with the same --sites (tied embeddings untied, as apply does)."""
    src = tiny_model(family, **kwargs)
    config = read_config(src)
    table = table_for_config(config)
    d_model, n_layers, tied = table.dims(config)
    assert tied  # the embedding edit has to respect apply's tied policy
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    found = interventions(
        model=model,
        table=table,
        checkpoint=Checkpoint.open(src),
        config=config,
        direction=load_direction(direction_file, d_model, n_layers),
        source=str(src),
    )
    inputs = encode_prompts(AutoTokenizer.from_pretrained(src), PROMPTS)
    plain = _logits(model, inputs)
    edits = {iv.name: iv for iv in found if iv.kind == "weight edit"}
    assert list(edits) == ["embed", "attn", "mlp", "all"]
    for name, iv in edits.items():
        sites = ["embed", "attn", "mlp"] if name == "all" else [name]
        plan, out = apply(
            ApplyConfig(model=str(src), direction=direction_file, out=tmp_path / name, sites=sites)
        )
        assert iv.plan.ops == plan.ops and iv.plan.tied_policy == plan.tied_policy == "untie"
        with iv.hooks():
            hooked = _logits(model, inputs)
        edited = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), inputs)
        diff = max(float((a - b).abs().max()) for a, b in zip(hooked, edited, strict=True))
        moved = max(float((a - b).abs().max()) for a, b in zip(hooked, plain, strict=True))
        assert diff <= 1e-4, (name, diff)
        assert moved > 1e-2, name  # the condition changes the logits measurably


def test_tiny_model_cli_and_a_skipped_embedding(tiny_model, direction_file, tmp_path):
    """Gemma ties its embeddings with the 'skip' policy, so the embedding-only weight edit is
    not applicable (apply would edit nothing): reported as n/a, drawn as such, the rest runs.
    The default prompts are the bundled test splits."""
    src = tiny_model("gemma")
    before = folder_digest(src)
    out = tmp_path / "sites"
    args = ["study", "sites", src, "--direction", direction_file, "--out", out, "--n", "4"]
    result = cli(*args, "--max-new-tokens", "3", "--refusal-tokens", "the", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert folder_digest(src) == before
    report = json.loads((out / "sites.json").read_text())
    settings = report["settings"]
    assert settings["counts"] == {"harmful": 4, "harmless": 4}
    assert settings["prompt_sources"]["harmful"] == "bundled (test split)"
    assert settings["tied_policy"] == "skip"
    assert report["refusal_tokens_from"] == "--refusal-tokens"
    c = _by_name(report)
    embed = c["weight edit", "embed"]
    assert embed["log_odds"] is None and "edits nothing" in embed["note"]
    assert "left unedited" in c["weight edit", "all"]["note"]
    one = c["run time", ONE_LAYER]  # a direction file that does not say its layer
    assert one["log_odds"] is None and "which layer" in one["note"]
    na = {("weight edit", "embed"), ("run time", ONE_LAYER)}
    assert all(v["log_odds"] is not None for k, v in c.items() if k not in na)
    assert "| weight edit | embed (embed) | n/a |" in (out / "sites.md").read_text()
    _check_png(out / "sites.png")
    again = cli(*args, "--refusal-tokens", "the")
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def _bad_direction(tmp_path: Path, name: str, values) -> Path:
    return save_direction(tmp_path / "in" / name, np.asarray(values, dtype=np.float32))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("size", "the model's hidden size is 32"),
        ("nan", "NaN or Inf"),
        ("model", "no such folder"),
        ("prompts", "does not exist"),
        ("jsonl", "invalid JSON"),
        ("judge", "--judge-model"),
        ("scheme", "hf:PATH_OR_ID"),
        ("tokens", "give single tokens"),
        ("n", "--n must be >= 1"),
    ],
)
def test_bad_inputs_write_nothing(tiny_model, direction_file, tmp_path, case, needle):
    (tmp_path / "in").mkdir()
    model, direction = str(tiny_model("llama")), direction_file
    extra: list = []
    if case == "size":
        direction = _bad_direction(tmp_path, "short.safetensors", np.ones(31))
    elif case == "nan":
        direction = _bad_direction(tmp_path, "nan.safetensors", [np.nan] + [1.0] * 31)
    elif case == "model":
        model = str(tmp_path / "no-model")
    elif case == "prompts":
        extra = ["--harmful", tmp_path / "in" / "missing.jsonl"]
    elif case == "jsonl":
        (tmp_path / "in" / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
        extra = ["--harmless", tmp_path / "in" / "bad.jsonl"]
    elif case == "judge":
        extra = ["--judge", "openai:http://localhost:1/v1"]
    elif case == "scheme":
        extra = ["--judge", "llamaguard"]
    elif case == "tokens":
        extra = ["--refusal-tokens", "I cannot"]
    elif case == "n":
        extra = ["--n", "0"]
    inputs = sorted(p.name for p in (tmp_path / "in").iterdir())
    out = tmp_path / "out" / "sites"
    result = cli("study", "sites", model, "--direction", direction, "--out", out, *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert needle in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == inputs


def test_study_help_comes_from_the_config_model():
    from orthoedit.config import StudySitesConfig

    top = cli("study", "--help")
    assert top.exit_code == 0 and "Research: where refusal lives." in top.output
    text = " ".join(cli("study", "sites", "--help").output.replace("│", " ").split())
    for name, field in StudySitesConfig.model_fields.items():
        if name not in ("model",):
            assert "--" + name.replace("_", "-") in text, name
        assert field.description.split("[")[0].split("(")[0].strip() in text, name
