"""Mixture-of-experts tables: every expert (and shared expert) of every sparse layer is a
residual writer, dense layers between sparse ones use their own MLP, and a checkpoint that
does not match gets a clear error. (Equivalence with hook ablation runs for these families
in test_equivalence.py, with the other families.)"""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import apply
from orthoedit.errors import UnsupportedModelError


def _plan(folder, direction, **kwargs):
    plan, _ = apply(ApplyConfig(model=str(folder), direction=direction, out=".", dry_run=True,
                                **kwargs))  # fmt: skip
    return plan


def _mlp_tensors(plan, layer: int) -> list[str]:
    return sorted(op.tensor for op in plan.ops if op.site == "mlp" and op.layer == layer)


def test_mixtral_every_expert(tiny_model, direction_file):
    plan = _plan(tiny_model("mixtral"), direction_file)
    for layer in (0, 1):
        assert _mlp_tensors(plan, layer) == [
            f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)
        ]
    modules = {op.module for op in plan.ops if op.site == "mlp"}
    assert modules == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}


def test_qwen2_moe_experts_shared_expert_and_dense_layer(tiny_model, direction_file):
    plan = _plan(tiny_model("qwen2_moe"), direction_file)
    experts = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)]
    assert _mlp_tensors(plan, 0) == sorted(
        [*experts, "model.layers.0.mlp.shared_expert.down_proj.weight"]
    )
    assert _mlp_tensors(plan, 1) == ["model.layers.1.mlp.down_proj.weight"]  # mlp_only_layers


def test_qwen3_moe_reads_either_expert_count_key(tiny_model, direction_file, tmp_path):
    src = tmp_path / "q3"
    shutil.copytree(tiny_model("qwen3_moe"), src)
    config = json.loads((src / "config.json").read_text())
    # transformers writes num_local_experts; the Hub's Qwen3-MoE configs say num_experts
    config["num_experts"] = config.pop("num_local_experts")
    (src / "config.json").write_text(json.dumps(config))
    plan = _plan(src, direction_file)
    assert len(_mlp_tensors(plan, 0)) == 4 and len(_mlp_tensors(plan, 1)) == 1


def test_missing_expert_is_a_clear_error(tiny_model, direction_file, tmp_path):
    src = tmp_path / "mx"
    shutil.copytree(tiny_model("mixtral"), src)
    config = json.loads((src / "config.json").read_text())
    config["num_local_experts"] = 5  # the config promises an expert the weights lack
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"experts\.4\.w2\.weight .* missing"):
        _plan(src, direction_file)
    del config["num_local_experts"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="num_local_experts"):
        _plan(src, direction_file)


def test_layer_without_any_mlp_writer_is_refused(tiny_model, direction_file, tmp_path):
    src = tmp_path / "q3"
    shutil.copytree(tiny_model("qwen3_moe"), src)
    name = "model.layers.1.mlp.down_proj.weight"
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match=r"no mlp writer .* layer 1"):
        _plan(src, direction_file)
    # editing only layer 0 does not need layer 1's writers
    assert _plan(src, direction_file, layers="0:1").layers == (0, 1)


def test_gpt_oss_fused_experts(tiny_model, direction_file, tmp_path):
    """Experts fused on disk: one [experts, in, d_model] tensor and one [experts, d_model]
    bias per layer, each vector of d_model projected (rows), checked against the math."""
    import numpy as np

    from orthoedit.edit.ortho import orthogonalize
    from orthoedit.edit.plan import unit_vector
    from orthoedit.model.checkpoint import Checkpoint

    src = tiny_model("gpt_oss")
    plan, _ = apply(ApplyConfig(model=str(src), direction=direction_file, out=tmp_path / "o"))
    mlp = [op for op in plan.ops if op.site == "mlp" and op.layer == 0]
    assert [(op.tensor, op.axis) for op in mlp] == [
        ("model.layers.0.mlp.experts.down_proj", 2),
        ("model.layers.0.mlp.experts.down_proj_bias", 1),
    ]
    source, edited = Checkpoint.open(src), Checkpoint.open(tmp_path / "o")
    for op in mlp:
        before = source.read(op.tensor)
        expect = orthogonalize(before, unit_vector(op, plan.r, source), op.axis)
        np.testing.assert_allclose(edited.read(op.tensor), expect, atol=1e-6)
        assert before.ndim == op.axis + 1
