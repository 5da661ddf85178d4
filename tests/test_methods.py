"""Edit methods: ``norm-preserving`` (each written vector keeps its length) and
``biprojected`` (the direction is first made orthogonal to the harmless mean), each tested
for its defining property, through the streaming writer and verify."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.ortho import orthogonalize, unit
from orthoedit.edit.plan import Plan, unit_vector
from orthoedit.errors import BadInputError
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.model.direction import save_direction
from orthoedit.verify import verify
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)


def _lengths(w: np.ndarray, axis: int) -> np.ndarray:
    return np.linalg.norm(np.moveaxis(w, axis, -1), axis=-1)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 0.4])
def test_norm_preserving_math(axis, scale):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 24) if axis == 0 else (24, 16))
    u = unit(rng.normal(size=16))
    out = orthogonalize(w, u, axis, scale, preserve_norm=True)
    np.testing.assert_allclose(_lengths(out, axis), _lengths(w, axis), rtol=1e-12)
    along = np.moveaxis(out, axis, -1) @ u
    if scale == 1.0:
        assert np.abs(along).max() < 1e-12
    else:  # the component left is (1 - s) of the original, scaled with the vector
        before = np.moveaxis(w, axis, -1) @ u
        assert np.all(np.abs(along) < np.abs(before))
        assert np.all(np.sign(along) == np.sign(before))


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # Linear [d, in]; Conv1D rows and biases
def test_norm_preserving_edit(family, tiny_model, direction_file, tmp_path):
    src = tiny_model(family, **({"bias": True} if family == "llama" else {}))
    out = tmp_path / "np"
    scales = tmp_path / "scales.json"
    scales.write_text(json.dumps({"attn": [1.0, 0.5]}))
    plan, _ = apply(
        ApplyConfig(
            model=str(src), direction=direction_file, out=out, method="norm-preserving",
            scales=scales,
        )
    )  # fmt: skip
    assert plan.method == "norm-preserving" and not plan.exact
    source, edited = Checkpoint.open(src), Checkpoint.open(out)
    for op in plan.ops:
        before, after = source.read(op.tensor), edited.read(op.tensor)
        u = unit_vector(op, plan.r, source)
        expect = orthogonalize(before, u, op.axis, op.scale, preserve_norm=True)
        np.testing.assert_allclose(after, expect, rtol=1e-5, atol=1e-6, err_msg=op.tensor)
        if before.ndim == 1:
            lengths = np.linalg.norm(after), np.linalg.norm(before)
        else:
            lengths = _lengths(after, op.axis), _lengths(before, op.axis)
        np.testing.assert_allclose(*lengths, rtol=1e-5, err_msg=op.tensor)
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda m: None)
    assert report.passed, report.failures
    assert report.method == "norm-preserving" and report.max_norm_change < 1e-5
    assert report.mean_kl > 1e-7  # not run-time ablation: reported, not judged
    card = (out / "README.md").read_text()
    assert "`norm-preserving`" in card and "compares it by KL" in card


def test_norm_preserving_bf16_verifies(tiny_model, direction_file, tmp_path):
    src = tiny_model("llama", dtype=torch.bfloat16)
    out = tmp_path / "np"
    apply(ApplyConfig(model=str(src), direction=direction_file, out=out, method="norm-preserving"))
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda m: None)
    assert report.passed, report.failures
    assert 0 < report.max_norm_change < 1e-2


def test_verify_catches_lengths_that_were_not_kept(tiny_model, direction_file, tmp_path):
    """A plain projection relabelled as norm-preserving fails on the lengths."""
    src, out = tiny_model("llama"), tmp_path / "p"
    apply(ApplyConfig(model=str(src), direction=direction_file, out=out))
    plan = json.loads((out / "plan.json").read_text())
    plan["method"] = "norm-preserving"
    (out / "plan.json").write_text(json.dumps(plan))
    result = cli("verify", src, out)
    assert result.exit_code == 1 and "vector lengths changed" in result.stderr


def _harmless_mean(run) -> np.ndarray:
    record = json.loads((run / "direction" / "direction.json").read_text())
    with safe_open(str(run / "direction" / "candidates.safetensors"), "np") as f:
        means = f.get_tensor("harmless_mean")
    return means[record["layer"], means.shape[1] + record["position"]].astype(np.float64)


def test_biprojected_direction_is_orthogonal_to_the_harmless_mean(organism_run, tmp_path):
    from orthoedit.organism import CHAT_MODEL

    direction = organism_run / "direction" / "direction.safetensors"
    out = tmp_path / "bi"
    result = cli("apply", CHAT_MODEL, "--direction", direction, "--out", out,
                 "--method", "biprojected")  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = Plan.load(out)
    mean = _harmless_mean(organism_run)
    cos = float(plan.r @ mean) / (np.linalg.norm(plan.r) * np.linalg.norm(mean))
    assert abs(cos) < 1e-9
    before = plan.method_details["cosine_with_harmless_mean"]
    assert abs(before) > 1e-3  # there was something to remove
    assert plan.method == "biprojected" and plan.exact
    assert verify(VerifyConfig(source=str(CHAT_MODEL), edited=out), log=lambda m: None).passed
    assert "`biprojected`" in (out / "README.md").read_text()
    # the same with the mean given as a file
    mean_file = save_direction(tmp_path / "mean.safetensors", torch.from_numpy(mean))
    plan2, _ = apply(
        ApplyConfig(model=str(CHAT_MODEL), direction=direction, out=tmp_path / "bi2",
                    method="biprojected", harmless_mean=mean_file)
    )  # fmt: skip
    np.testing.assert_allclose(plan2.r, plan.r, rtol=1e-6, atol=1e-9)


def test_biprojected_needs_a_harmless_mean(tiny_model, direction_file, tmp_path):
    with pytest.raises(BadInputError, match="needs the harmless mean"):
        apply(ApplyConfig(model=str(tiny_model("llama")), direction=direction_file,
                          out=tmp_path / "o", method="biprojected"))  # fmt: skip
    with pytest.raises(BadInputError, match="is for --method biprojected"):
        apply(ApplyConfig(model=str(tiny_model("llama")), direction=direction_file,
                          out=tmp_path / "o", harmless_mean=direction_file))  # fmt: skip
    assert not (tmp_path / "o").exists()
