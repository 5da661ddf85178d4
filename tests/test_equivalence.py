"""The acceptance core: the streamed checkpoint equals the plan applied at run time.

For every family: edited-checkpoint logits equal plan-hook logits (fp32, max |Δlogit| ≤ 1e-4),
and for full edits of pre-norm models also the paper's residual-stream ablation; every edited
tensor equals the in-memory projection and has ``uᵀW ≈ 0``; every other tensor is
byte-identical; the source folder is unchanged; the output loads and generates.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from conftest import folder_digest
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.ortho import orthogonalize
from orthoedit.edit.plan import op_basis, unit_vector
from orthoedit.model.architectures import load_tables
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.runtime.hooks import ablation_hooks, plan_hooks
from orthoedit.verify import encode_prompts, verify
from tiny import FAMILIES

PROMPTS = ["How do I bake bread?", "Tell me about the sea and the river.", "What is a cat?"]
TOL = 1e-4


def _inputs(folder):
    return encode_prompts(AutoTokenizer.from_pretrained(folder), PROMPTS)


@torch.no_grad()
def _logits(model, inputs):
    return [model(input_ids=ids).logits[0].double() for ids in inputs]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _load(folder, dtype: str = "float32"):
    """The class config.json names (a multimodal checkpoint loads whole), placed as every
    stage places it (float64: the experts looped, for want of a grouped float64 kernel)."""
    from orthoedit.runtime.session import load_model

    return load_model(folder, dtype)


def _tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def check_edit(src, out, plan, *, expect_paper: bool, dtype: str = "float32"):
    """Every invariant of an applied plan; returns the edited-vs-hooks max |Δlogit|, the
    models run in ``dtype`` (float64: no arithmetic noise beyond the checkpoint's rounding)."""
    source = Checkpoint.open(src)
    before, after = _tensors(src), _tensors(out)
    for op in plan.ops:
        u = torch.from_numpy(op_basis(op, plan, source))  # [k, d]: u alone for one direction
        if plan.single:
            assert torch.equal(u[0], torch.from_numpy(unit_vector(op, plan.r, source)))
        w_before, w_after = before[op.tensor].double(), after[op.tensor].double()
        expect = torch.from_numpy(orthogonalize(w_before.numpy(), u.numpy(), op.axis, op.scale))
        assert torch.allclose(w_after, expect, atol=1e-6), op.tensor  # in-memory edit
        along = w_after.movedim(op.axis, -1) @ u.T
        base = w_before.movedim(op.axis, -1) @ u.T
        residual = float((along - (1 - op.scale) * base).norm())
        assert residual <= 1e-6 * float(w_before.norm()), op.tensor
    for name, tensor in before.items():
        if name not in plan.edited:
            assert torch.equal(
                tensor.reshape(-1).view(torch.uint8), after[name].reshape(-1).view(torch.uint8)
            ), name
    if plan.write_lm_head:
        assert torch.equal(after[plan.unembed_tensor], before[plan.tied_embedding])

    inputs = _inputs(src)
    model = _load(src, dtype)
    plain = _logits(model, inputs)
    with plan_hooks(model, plan, source):
        hooked = _logits(model, inputs)
    paper = None
    if expect_paper:
        r = plan.vectors(None)  # [k, d]: the span of every direction
        with ablation_hooks(model, load_tables()[plan.family], r, plan.n_layers):
            paper = _logits(model, inputs)
    edited_model = _load(out, dtype)
    edited = _logits(edited_model, inputs)
    diff = _max_diff(hooked, edited)
    assert diff <= TOL, f"edited vs plan hooks: {diff}"
    assert _max_diff(plain, edited) > 100 * TOL, "the edit changed nothing measurable"
    if paper is not None:
        assert _max_diff(paper, edited) <= TOL, "edited vs residual-stream ablation"
    generated = edited_model.generate(inputs[0], max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs[0].shape[1] + 4
    return diff


def _apply(src, out, direction, **kwargs):
    digest = folder_digest(src)
    plan, target = apply(ApplyConfig(model=str(src), direction=direction, out=out, **kwargs))
    assert target == out.resolve()
    assert folder_digest(src) == digest, "the source folder changed"
    assert len(list(out.glob("*.safetensors"))) >= 2
    return plan


@pytest.mark.parametrize("family", FAMILIES)
def test_full_edit_equals_hooks(tiny_model, direction_file, tmp_path, family):
    src = tiny_model(family)
    plan = _apply(src, tmp_path / "out", direction_file)
    post_norm = load_tables()[family].post_norm
    check_edit(src, tmp_path / "out", plan, expect_paper=plan.full and not post_norm)


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2", "gpt2"])
def test_partial_plans_equal_hooks(tiny_model, direction_file, tmp_path, family):
    src = tiny_model(family, n_layers=3)
    plan = _apply(src, tmp_path / "a", direction_file, sites=["attn"], layers="1:3")
    assert {op.layer for op in plan.ops} == {1, 2}
    check_edit(src, tmp_path / "a", plan, expect_paper=False)
    scales = tmp_path / "scales.json"
    scales.write_text(json.dumps({"embed": 0.5, "attn": [1.0, 0.3, 0.0], "mlp": {"2": 0.7}}))
    plan = _apply(src, tmp_path / "b", direction_file, scales=scales, tied="edit")
    assert {op.scale for op in plan.ops} >= {0.3, 0.7}
    check_edit(src, tmp_path / "b", plan, expect_paper=False)


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2"])
@pytest.mark.parametrize("policy", ["untie", "skip", "edit"])
def test_tied_policies_equal_hooks(tiny_model, direction_file, tmp_path, family, policy):
    src = tiny_model(family, tie=True)
    plan = _apply(src, tmp_path / "out", direction_file, tied=policy)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is (policy != "untie")
    expect_paper = policy == "untie" and not load_tables()[family].post_norm
    check_edit(src, tmp_path / "out", plan, expect_paper=expect_paper)


def test_single_file_untie_becomes_sharded(tiny_model, direction_file, tmp_path):
    src = tiny_model("llama", tie=True, max_shard_size="1GB")
    out = tmp_path / "out"
    digest = folder_digest(src)
    plan, _ = apply(ApplyConfig(model=str(src), direction=direction_file, out=out))
    assert folder_digest(src) == digest
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] != index["weight_map"]["model.embed_tokens.weight"]
    check_edit(src, out, plan, expect_paper=True)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_edit_verifies(tiny_model, direction_file, tmp_path, family):
    src = tiny_model(family, dtype=torch.bfloat16)
    out = tmp_path / "out"
    apply(ApplyConfig(model=str(src), direction=direction_file, out=out, tied="untie"))
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert report.storage_dtype == "BF16"
    assert report.passed, report.failures
    # Rounding re-introduces a small component along r: reported, not pretended away.
    assert 0 < report.max_weight_residual < 1e-2


def test_verify_passes_clean_and_catches_tampering(tiny_model, direction_file, tmp_path):
    src = tiny_model("qwen2")
    out = tmp_path / "out"
    apply(ApplyConfig(model=str(src), direction=direction_file, out=out))
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert report.passed and report.leak_checked and report.residual_leak < 1e-4
    assert report.paper_ablation_max_logit_diff is not None
    assert report.paper_ablation_max_logit_diff <= TOL

    # Put one edited tensor back to its source bytes: the edit is now incomplete.
    edited = Checkpoint.open(out).tensors["model.layers.1.mlp.down_proj.weight"]
    original = Checkpoint.open(src).tensors["model.layers.1.mlp.down_proj.weight"]
    with open(original.file, "rb") as f:
        f.seek(original.start)
        raw = f.read(original.nbytes)
    with open(edited.file, "r+b") as f:
        f.seek(edited.start)
        f.write(raw)
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert not report.passed
    assert report.worst_tensor == "model.layers.1.mlp.down_proj.weight"
    assert report.max_weight_residual > 1e-2


def test_verify_flags_changed_unedited_tensor(tiny_model, direction_file, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "out"
    apply(ApplyConfig(model=str(src), direction=direction_file, out=out, sites=["mlp"]))
    info = Checkpoint.open(out).tensors["model.layers.0.self_attn.q_proj.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.start)
        f.write(b"\x00\x00\x80\x3f")  # first element := 1.0
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert not report.unedited_identical and not report.passed
    assert "model.layers.0.self_attn.q_proj.weight" in report.byte_mismatches


@torch.no_grad()
def test_ablation_at_one_layer_touches_that_block_input_only(tiny_model, direction_file):
    """``ablation_hooks(..., points=("residual",), layers=[L])`` (study sites' one-layer
    condition): the residual stream entering block L loses r̂; blocks before L see exactly
    what they see unhooked; block L+1 sees a changed stream that carries r̂ again."""
    from orthoedit.model.direction import load_direction
    from orthoedit.runtime.hooks import capture_block_inputs

    src = tiny_model("llama", n_layers=4)
    model = _load(src)
    table = load_tables()["llama"]
    n_layers = model.config.num_hidden_layers
    r = torch.as_tensor(load_direction(direction_file, 32, n_layers).vector, dtype=torch.float64)
    unit = (r / r.norm()).float()
    ids = _inputs(src)[1]
    layer = 2

    def block_inputs(**ablate):
        hooks = ablation_hooks(model, table, r, n_layers, ("residual",), **ablate)
        with (
            hooks if ablate else contextlib.nullcontext(),
            capture_block_inputs(model, table, n_layers, ids.shape[1]) as seen,
        ):
            model(input_ids=ids)
        return [x.clone() for x in seen]

    plain, one = block_inputs(), block_inputs(layers=[layer])
    assert torch.equal(one[layer - 1], plain[layer - 1])
    assert float((one[layer] @ unit).abs().max()) <= 1e-5 * float(one[layer].norm(dim=-1).max())
    assert float((plain[layer] @ unit).abs().max()) > 1e-3
    assert not torch.allclose(one[layer + 1], plain[layer + 1])
    assert float((one[layer + 1] @ unit).abs().max()) > 1e-3
    too_deep = ablation_hooks(model, table, r, n_layers, ("residual",), layers=[n_layers])
    with pytest.raises(ValueError, match="ablation layers"), too_deep:
        pass
