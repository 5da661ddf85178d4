"""The plan: which tensors are projected, against what, with which scale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import prepare
from orthoedit.edit.plan import build_plan
from orthoedit.edit.scope import load_scales, parse_layers
from orthoedit.errors import BadInputError, UnsupportedModelError
from orthoedit.model.architectures import load_tables
from orthoedit.model.direction import load_direction
from tiny import FAMILIES


def _plan(model, direction, **kwargs):
    return prepare(
        ApplyConfig(model=str(model), direction=direction, out="unused", dry_run=True, **kwargs)
    ).plan


@pytest.mark.parametrize("family", FAMILIES)
def test_default_plan_covers_every_writer(tiny_model, direction_file, family):
    plan = _plan(tiny_model(family), direction_file)
    by_site = {s: [op for op in plan.ops if op.site == s] for s in ("embed", "attn", "mlp")}
    per_layer = 2 if family in ("gpt2", "gpt_oss") else 1  # writers with biases
    assert len(by_site["attn"]) == 2 * per_layer
    # mixtures of experts (tests/test_moe.py): 4 experts, Qwen2-MoE's shared expert, and the
    # Qwen MoE tiny models' dense layer 1
    mlp = {"mixtral": 4 + 4, "qwen2_moe": 5 + 1, "qwen3_moe": 4 + 1}.get(family, 2 * per_layer)
    assert len(by_site["mlp"]) == mlp
    assert {op.layer for op in by_site["attn"]} == {0, 1}
    if family.startswith("gemma"):  # tied, default policy 'skip'
        assert by_site["embed"] == [] and plan.tied_policy == "skip" and plan.warnings
    else:
        assert len(by_site["embed"]) == (2 if family == "gpt2" else 1)  # wte + wpe
    post = family in ("gemma2", "gemma3", "olmo2")
    assert all((op.norm is not None) == post for op in by_site["attn"] + by_site["mlp"])
    assert plan.full == (not family.startswith("gemma"))


def test_sites_layers_and_scales(tiny_model, direction_file, tmp_path):
    model = tiny_model("llama")
    plan = _plan(model, direction_file, sites=["attn"], layers="1:")
    assert [op.tensor for op in plan.ops] == ["model.layers.1.self_attn.o_proj.weight"]
    assert not plan.full
    scales = tmp_path / "scales.json"
    scales.write_text(json.dumps({"embed": 0.5, "attn": [1.0, 0.0], "mlp": {"1": 0.25}}))
    plan = _plan(model, direction_file, scales=scales)
    got = {(op.site, op.layer): op.scale for op in plan.ops}
    assert got == {("embed", None): 0.5, ("attn", 0): 1.0, ("mlp", 0): 1.0, ("mlp", 1): 0.25}
    assert plan.scales == {"embed": 0.5, "attn:0": 1.0, "mlp:0": 1.0, "mlp:1": 0.25}


def test_bias_writers_planned(tiny_model, direction_file):
    plan = _plan(tiny_model("llama", bias=True), direction_file)
    names = {op.tensor for op in plan.ops}
    assert "model.layers.0.self_attn.o_proj.bias" in names
    assert "model.layers.1.mlp.down_proj.bias" in names


@pytest.mark.parametrize(
    "policy, embed_edited, write_head, projected",
    [("untie", True, True, False), ("skip", False, False, False), ("edit", True, False, True)],
)
def test_tied_policies(tiny_model, direction_file, policy, embed_edited, write_head, projected):
    plan = _plan(tiny_model("llama", tie=True), direction_file, tied=policy)
    assert plan.tied and plan.tied_policy == policy
    assert ("model.embed_tokens.weight" in plan.edited) == embed_edited
    assert plan.write_lm_head == write_head
    assert plan.unembed_projected == projected


def test_untied_model_ignores_policy(tiny_model, direction_file):
    plan = _plan(tiny_model("llama", tie=False), direction_file, tied="skip")
    assert not plan.tied and plan.tied_policy is None and not plan.write_lm_head
    assert "model.embed_tokens.weight" in plan.edited


def test_gpt2_checkpoint_without_transformer_prefix(model_copy, direction_file):
    """Original GPT-2 checkpoints store 'h.0...' rather than 'transformer.h.0...'."""
    src = model_copy("gpt2", max_shard_size="1GB")
    tensors = load_file(src / "model.safetensors")
    save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()},
        src / "model.safetensors",
        {"format": "pt"},
    )
    plan = _plan(src, direction_file)
    names = {op.tensor for op in plan.ops}
    assert {"wte.weight", "wpe.weight", "h.1.mlp.c_proj.bias"} <= names
    assert all(op.module.startswith("transformer.") for op in plan.ops)  # hooks use modules


def test_bias_on_disk_is_planned_even_where_unusual(model_copy, direction_file):
    src = model_copy("qwen3", max_shard_size="1GB")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(32)
    save_file(tensors, src / "model.safetensors", {"format": "pt"})
    assert "model.layers.0.mlp.down_proj.bias" in _plan(src, direction_file).edited


def test_residual_bias_missing_from_table_is_refused(model_copy, direction_file):
    """A writer's bias the table does not list would stay unedited: refuse, never guess."""
    src = model_copy("llama", bias=True, max_shard_size="1GB")
    table = load_tables()["llama"]
    writers = [w.model_copy(update={"bias": None}) for w in table.writers]
    prepared = prepare(ApplyConfig(model=str(src), direction=direction_file, out="x", dry_run=True))
    with pytest.raises(UnsupportedModelError, match=r"o_proj\.bias"):
        build_plan(
            table=table.model_copy(update={"writers": writers}),
            checkpoint=prepared.checkpoint,
            config=prepared.config,
            direction=load_direction(direction_file, 32, 2),
            source=str(src),
        )


def test_plan_edits_nothing_is_an_error(tiny_model, direction_file, tmp_path):
    scales = tmp_path / "s.json"
    scales.write_text(json.dumps({"attn": 0, "mlp": 0}))
    with pytest.raises(BadInputError, match="edits nothing"):
        _plan(tiny_model("llama"), direction_file, sites=["attn", "mlp"], scales=scales)


def test_transposed_table_is_caught(model_copy, direction_file):
    """A writer stored with d_model on the wrong axis is refused, never edited wrongly."""
    src = model_copy("llama", max_shard_size="1GB")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].T.contiguous()
    save_file(tensors, src / "model.safetensors", {"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="o_proj"):
        _plan(src, direction_file)


@pytest.mark.parametrize(
    "spec, expect",
    [
        (None, (0, 8)),
        (":", (0, 8)),
        ("2:5", (2, 5)),
        ("4:", (4, 8)),
        (":-2", (0, 6)),
        ("-3:", (5, 8)),
    ],
)
def test_parse_layers(spec, expect):
    assert parse_layers(spec, 8) == expect


@pytest.mark.parametrize("spec", ["5:2", "3", "a:b", "9:", "2:99", "-9:", ":9"])
def test_parse_layers_rejects(spec):
    with pytest.raises(BadInputError):
        parse_layers(spec, 8)


@pytest.mark.parametrize(
    "content",
    [
        '{"attn": [1.0]}',
        '{"attn": 1.5}',
        '{"ffn": 1}',
        '{"mlp": {"9": 1}}',
        '{"embed": [1]}',
        "not json",
    ],
)
def test_load_scales_rejects(tmp_path, content):
    path = tmp_path / "scales.json"
    path.write_text(content)
    with pytest.raises(BadInputError, match="--scales"):
        load_scales(path, 2)


@pytest.mark.parametrize("axis", [0, 1])
def test_checkpoint_along_in_blocks_matches_whole_tensor(tiny_model, axis):
    """verify measures uᵀW block by block; it must equal the whole-tensor computation."""
    from orthoedit.model.checkpoint import Checkpoint

    ckpt = Checkpoint.open(tiny_model("llama", dtype=torch.bfloat16))
    name = "model.embed_tokens.weight" if axis == 1 else "model.layers.0.mlp.down_proj.weight"
    w = ckpt.read(name)
    u = np.random.default_rng(0).standard_normal(32)
    u /= np.linalg.norm(u)
    got, norm = ckpt.along(name, u, axis, block_bytes=1000)  # many small blocks
    assert np.allclose(got, np.moveaxis(w, axis, -1) @ u, atol=1e-12)
    assert np.isclose(norm, np.linalg.norm(w))
