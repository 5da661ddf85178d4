"""Opt-in (``-m real``): a real Gemma 3 checkpoint, the base Gemma 3 270M (``make gemma3``):
sandwich norms with 1 + weight, sliding-window layers and a 262k vocabulary, in bfloat16.

A full edit (the embedding untied) verifies against the plan's hooks within bfloat16's
tolerances, the residual stream keeps next to nothing along r, and the source is unchanged.
The model does not follow a chat, so no refusal is measured on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import folder_digest
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.model.direction import save_direction
from orthoedit.verify import verify

ROOT = Path(__file__).resolve().parents[1]
GEMMA3 = Path(os.environ.get("ORTHOEDIT_GEMMA3", ROOT / "models" / "gemma-3-270m"))

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        not (GEMMA3 / "config.json").is_file(), reason=f"no Gemma 3 at {GEMMA3} (make gemma3)"
    ),
]


def test_full_edit_of_a_real_gemma3_verifies(tmp_path):
    config = json.loads((GEMMA3 / "config.json").read_text())
    gen = torch.Generator().manual_seed(3)
    direction = save_direction(
        tmp_path / "direction.safetensors", torch.randn(config["hidden_size"], generator=gen)
    )
    digest = folder_digest(GEMMA3)
    out = tmp_path / "edited"
    plan, _ = apply(ApplyConfig(model=str(GEMMA3), direction=direction, out=out, tied="untie"))
    assert folder_digest(GEMMA3) == digest
    assert plan.family == "gemma3" and plan.full and plan.write_lm_head
    assert all(op.norm is not None for op in plan.ops if op.site != "embed")
    report = verify(VerifyConfig(source=str(GEMMA3), edited=out, max_prompts=4), log=print)
    assert report.passed, report.failures
    assert report.storage_dtype == "BF16" and report.leak_checked
    assert report.residual_leak < 1e-2
