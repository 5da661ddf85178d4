"""Opt-in: a real chat model (SmolLM2-135M-Instruct, tied embeddings, real chat template).

Skipped unless the converted checkpoint exists: ``make smollm`` writes it to
``models/smollm2-135m-instruct`` (or set ORTHOEDIT_SMOLLM to a folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import folder_digest
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.model.direction import save_direction
from orthoedit.verify import verify

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = Path(os.environ.get("ORTHOEDIT_SMOLLM", ROOT / "models" / "smollm2-135m-instruct"))

pytestmark = [
    pytest.mark.smollm,
    pytest.mark.skipif(
        not (SMOLLM / "config.json").is_file(), reason=f"no SmolLM2 at {SMOLLM} (make smollm)"
    ),
]


@pytest.fixture(scope="module")
def direction(tmp_path_factory) -> Path:
    gen = torch.Generator().manual_seed(7)
    path = tmp_path_factory.mktemp("smol") / "direction.safetensors"
    return save_direction(path, torch.randn(576, generator=gen))


def test_untie_edit_verifies_on_real_model(direction, tmp_path):
    digest = folder_digest(SMOLLM)
    out = tmp_path / "edited"
    plan, _ = apply(ApplyConfig(model=str(SMOLLM), direction=direction, out=out))
    assert folder_digest(SMOLLM) == digest
    assert plan.tied and plan.tied_policy == "untie" and plan.write_lm_head and plan.full
    assert len(plan.ops) == 1 + 2 * 30
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    report = verify(VerifyConfig(source=str(SMOLLM), edited=out, max_prompts=3), log=print)
    assert report.passed, report.failures
    assert report.paper_ablation_max_logit_diff is not None
    assert report.residual_leak < 1e-4


def test_bf16_edit_verifies_on_real_model(direction, tmp_path):
    src = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(SMOLLM, dtype=torch.bfloat16)
    model.save_pretrained(src, max_shard_size="100MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (SMOLLM / name).exists():
            (src / name).write_bytes((SMOLLM / name).read_bytes())
    out = tmp_path / "edited"
    apply(ApplyConfig(model=str(src), direction=direction, out=out, layers="5:25"))
    report = verify(VerifyConfig(source=str(src), edited=out, max_prompts=3), log=print)
    assert report.storage_dtype == "BF16"
    assert report.passed, report.failures
    assert not report.leak_checked  # a partial plan: the leak is reported, not judged


def test_eval_bench_runs_shipped_tasks_on_a_real_model(tmp_path):
    """A real tokenizer and chat template through lm-eval, one task of each output type
    (log-likelihood choice and generation): the model against itself gives zero deltas, so
    nothing regresses. (organism_capability is in the organism's own vocabulary: its tests run
    it on the organism.)"""
    from orthoedit.config import EvalBenchConfig
    from orthoedit.evaluate.bench import eval_bench

    tasks = ["orthoedit_facts", "orthoedit_arith"]
    cfg = EvalBenchConfig(
        base=str(SMOLLM),
        edited=str(SMOLLM),
        out=tmp_path / "b",
        tasks=tasks,
        limit=6,
        batch_size=8,
        dtype="float32",
        offline=True,
    )
    result = eval_bench(cfg, log=lambda _: None)
    assert {r.task for r in result.rows} == set(tasks)
    assert result.settings["chat_template"] is True
    assert all(r.delta == 0 for r in result.rows) and not result.regressions
    facts = next(r for r in result.rows if r.task == "orthoedit_facts" and r.metric == "acc")
    assert facts.base > 0.25  # better than chance: the task reads as intended


def test_attribute_runs_on_the_real_model(direction, tmp_path):
    """GQA (9 query heads on 3 key-value heads), tied embeddings, a real template: heads add up
    to o_proj's output, the report is complete, and the ablated log-odds are the plan's."""
    from orthoedit.config import AttributeConfig
    from orthoedit.research.attribute import attribute

    result = attribute(
        AttributeConfig(
            model=str(SMOLLM),
            direction=direction,
            out=tmp_path / "attr",
            n=6,
            refusal_tokens="I",
            steps=1,
            top=3,
            cumulative=3,
        ),
        log=lambda m: None,
    )
    heads = [c for c in result.components if c.kind == "head"]
    assert len(heads) == 30 * 9 and len({c.layer for c in heads}) == 30
    assert {c.kind for c in result.components} == {"embed", "head", "mlp"}
    assert sum(c.patched is not None for c in result.components) == 3
    record = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    assert record["settings"]["n_heads"] == 9 and len(record["cumulative"]) == 4
