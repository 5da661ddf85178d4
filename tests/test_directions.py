"""Several directions: repeated ``--direction``, ``[k, d_model]`` spans and ``--per-layer``.

The edit projects out the orthonormalized span: ``‖U W'‖ ≈ 0`` for the whole span (checked
here with numpy's own QR, not the code's Gram-Schmidt), the checkpoint equals the plan's hooks
for every family, a full pre-norm edit equals run-time ablation of the span, and per-layer rows
land in their own layers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import D_MODEL, folder_digest, leftovers
from orthoedit.cli import app
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.ortho import orthogonalize
from orthoedit.edit.plan import Plan, op_basis
from orthoedit.errors import BadInputError
from orthoedit.model.architectures import load_tables
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.model.direction import orthonormal, save_direction
from orthoedit.verify import verify
from test_equivalence import check_edit
from tiny import FAMILIES

N_LAYERS = 2


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def span_files(tmp_path_factory):
    """A single direction and a 2-vector span file: three directions in all."""
    folder = tmp_path_factory.mktemp("span")
    one = save_direction(folder / "one.safetensors", _rand(D_MODEL, seed=1))
    two = save_direction(folder / "two.safetensors", _rand(2, D_MODEL, seed=2), {"kind": "span"})
    return [one, two]


def _stored(folder, name: str) -> np.ndarray:
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            if name in f.keys():  # noqa: SIM118
                return f.get_tensor(name).astype(np.float64)
    raise KeyError(name)


def _qr(vectors) -> np.ndarray:
    """Orthonormal rows spanning ``vectors`` by numpy's QR (independent of the code's)."""
    q, _ = np.linalg.qr(np.asarray(vectors, dtype=np.float64).T)
    return q.T


def _residual(weight: np.ndarray, q: np.ndarray, axis: int) -> float:
    """‖U W‖ / ‖W‖ along the residual axis."""
    return float(np.linalg.norm(np.moveaxis(weight, axis, -1) @ q.T) / np.linalg.norm(weight))


# --- the math -------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1])
def test_basis_projection_removes_the_whole_span(axis):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12) if axis == 0 else (12, 16))
    vectors = rng.standard_normal((3, 16))
    q = orthonormal(vectors)
    assert np.allclose(q @ q.T, np.eye(3), atol=1e-14)
    assert np.allclose(q, _qr(vectors) * np.sign(np.diag(q @ _qr(vectors).T))[:, None])
    out = orthogonalize(w, q, axis)
    assert _residual(out, _qr(vectors), axis) < 1e-14
    # The same as projecting the orthonormal vectors out one after another.
    seq = w
    for u in q:
        seq = orthogonalize(seq, u, axis)
    assert np.allclose(out, seq, atol=1e-12)
    # What lies outside the span is untouched.
    rest = np.moveaxis(w, axis, -1) - (np.moveaxis(w, axis, -1) @ q.T) @ q
    assert np.allclose(np.moveaxis(out, axis, -1), rest, atol=1e-12)


def test_one_vector_basis_is_the_unit_vector():
    v = np.random.default_rng(1).standard_normal(16)
    assert np.array_equal(orthonormal(v)[0], v / np.linalg.norm(v))


def test_dependent_vectors_are_refused():
    v = np.random.default_rng(2).standard_normal((2, 16))
    with pytest.raises(BadInputError, match="linearly dependent: vector 3"):
        orthonormal(np.concatenate([v, [v[0] - 0.5 * v[1]]]))


# --- spans through apply and verify ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_span_edit_equals_hooks(tiny_model, span_files, tmp_path, family):
    src = tiny_model(family)
    out = tmp_path / "out"
    digest = folder_digest(src)
    plan, _ = apply(ApplyConfig(model=str(src), direction=span_files, out=out))
    assert folder_digest(src) == digest
    assert len(plan.directions) == 3 and not plan.single
    table = load_tables()[family]
    check_edit(src, out, plan, expect_paper=plan.full and not table.post_norm)
    raw = np.asarray(plan.directions)
    source = Checkpoint.open(src)
    for op in plan.ops:
        vectors = raw if op.norm is None else (source.read(op.norm) + op.norm_offset) * raw
        assert _residual(_stored(out, op.tensor), _qr(vectors), op.axis) < 1e-6, op.tensor


def test_span_verifies_and_removes_it_from_the_residual(tiny_model, span_files, tmp_path):
    src = tiny_model("qwen2")
    out = tmp_path / "out"
    apply(ApplyConfig(model=str(src), direction=span_files, out=out))
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert report.passed, report.failures
    assert report.leak_checked and report.residual_leak < 1e-4
    assert report.paper_ablation_max_logit_diff <= 1e-4
    assert report.max_weight_residual < 1e-6
    # Artifacts: every file, under its own name, with the card naming each.
    assert (out / "orthoedit" / "direction.safetensors").read_bytes() == span_files[0].read_bytes()
    assert (out / "orthoedit" / "direction-2.safetensors").read_bytes() == (
        span_files[1].read_bytes()
    )
    card = (out / "README.md").read_text()
    assert "the span of 3 directions" in card
    assert "`orthoedit/direction-2.safetensors`" in card and "span, SHA-256" in card


def test_verify_checks_the_whole_span(tiny_model, span_files, tmp_path):
    """An edit made against the first direction alone, relabelled as a span edit, fails."""
    src = tiny_model("llama")
    out = tmp_path / "out"
    apply(ApplyConfig(model=str(src), direction=span_files[0], out=out))
    plan = json.loads((out / "plan.json").read_text())
    plan["directions"] += _rand(2, D_MODEL, seed=2).tolist()
    (out / "plan.json").write_text(json.dumps(plan))
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert not report.passed and report.max_weight_residual > 1e-2


def test_one_row_span_is_byte_identical_to_a_single_direction(tiny_model, tmp_path):
    src = tiny_model("gemma2")
    v = _rand(D_MODEL, seed=5)
    single = save_direction(tmp_path / "single.safetensors", v)
    span = save_direction(tmp_path / "span.safetensors", v[None], {"kind": "span"})
    apply(ApplyConfig(model=str(src), direction=single, out=tmp_path / "a"))
    apply(ApplyConfig(model=str(src), direction=span, out=tmp_path / "b"))
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_norm_preserving_span_keeps_lengths(tiny_model, span_files, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "out"
    apply(ApplyConfig(model=str(src), direction=span_files, out=out, method="norm-preserving"))
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert report.passed, report.failures
    assert report.max_norm_change < 1e-5 and report.max_weight_residual < 1e-6


def test_biprojected_span_is_orthogonal_to_the_mean(tiny_model, span_files, tmp_path):
    src = tiny_model("llama")
    mean = _rand(D_MODEL, seed=9)
    mean_file = save_direction(tmp_path / "mean.safetensors", mean)
    cfg = ApplyConfig(
        model=str(src),
        direction=span_files,
        out=tmp_path / "out",
        method="biprojected",
        harmless_mean=mean_file,
        dry_run=True,
    )
    plan, _ = apply(cfg)
    m = mean.double().numpy() / np.linalg.norm(mean.double().numpy())
    assert np.abs(np.asarray(plan.directions) @ m).max() < 1e-9
    assert len(plan.method_details["cosine_with_harmless_mean"]) == 3


# --- per-layer directions -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_per_layer_rows_land_in_their_layers(tiny_model, tmp_path, family):
    src = tiny_model(family)
    stack = _rand(N_LAYERS, D_MODEL, seed=3)
    per_layer = save_direction(tmp_path / "layers.safetensors", stack)
    extra = save_direction(tmp_path / "extra.safetensors", _rand(D_MODEL, seed=4))
    out = tmp_path / "out"
    plan, _ = apply(
        ApplyConfig(model=str(src), direction=[per_layer, extra], out=out, per_layer=True)
    )
    assert not plan.shared and plan.direction_files[0].kind == "per-layer"
    check_edit(src, out, plan, expect_paper=False)
    source = Checkpoint.open(src)
    for op in plan.ops:
        row = stack[0 if op.layer is None else op.layer].double().numpy()
        raw = np.stack([_rand(D_MODEL, seed=4).double().numpy(), row])
        if op.norm is not None:
            raw = (source.read(op.norm) + op.norm_offset) * raw
        assert _residual(_stored(out, op.tensor), _qr(raw), op.axis) < 1e-6, op.tensor
        if op.layer == 1 and op.norm is None:  # layer 1 keeps what lies along layer 0's row
            other = _qr(stack[0].double().numpy()[None])
            assert _residual(_stored(out, op.tensor), other, op.axis) > 1e-3, op.tensor
    report = verify(VerifyConfig(source=str(src), edited=out), log=lambda _: None)
    assert report.passed, report.failures
    assert not report.leak_checked  # no one span to look for in the residual stream


def test_old_single_direction_plans_still_load(tiny_model, direction_file, tmp_path):
    out = tmp_path / "out"
    plan, _ = apply(ApplyConfig(model=str(tiny_model("llama")), direction=direction_file, out=out))
    old = json.loads((out / "plan.json").read_text())
    first = old.pop("direction_files")[0]
    old["direction"] = old.pop("directions")[0]
    old.pop("per_layer_directions")
    old |= {"direction_file": first["file"], "direction_sha256": first["sha256"]}
    (out / "plan.json").write_text(json.dumps(old))
    assert Plan.load(out) == plan


# --- the command line and bad inputs ---------------------------------------------------------


def test_repeated_direction_on_the_command_line(tiny_model, span_files):
    from typer.testing import CliRunner

    args = ["apply", str(tiny_model("llama")), "--dry-run"]
    for path in span_files:
        args += ["--direction", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "span of 3 directions" in result.stdout


BAD = {
    "per-layer-on-single": ("single", {"per_layer": True}, ["--per-layer", "no --direction"]),
    "row-and-per-layer": ("stack", {"per_layer": True, "direction_layer": 0}, ["exclude"]),
    "span-with-row": ("span", {"direction_layer": 0}, ["no --direction holds one per layer"]),
    "stack-without-choice": ("stack", {}, ["--direction-layer N", "--per-layer"]),
    "dependent-files": ("twice", {}, ["linearly dependent", "vector 2"]),
    "wrong-width-second": ("narrow", {}, ["size 16", "hidden size is 32"]),
    "biprojected-per-layer": (
        "stack",
        {"per_layer": True, "method": "biprojected"},
        ["biprojected", "--per-layer"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_direction_sets(case, tiny_model, tmp_path):
    kind, options, needles = BAD[case]
    v = _rand(D_MODEL, seed=7)
    single = save_direction(tmp_path / "single.safetensors", v)
    files = {
        "single": [single],
        "stack": [save_direction(tmp_path / "stack.safetensors", _rand(N_LAYERS, D_MODEL, seed=8))],
        "span": [
            single,
            save_direction(
                tmp_path / "span.safetensors", _rand(2, D_MODEL, seed=8), {"kind": "span"}
            ),
        ],
        "twice": [single, save_direction(tmp_path / "twice.safetensors", 3 * v)],
        "narrow": [single, save_direction(tmp_path / "narrow.safetensors", _rand(16, seed=8))],
    }[kind]
    out = tmp_path / "out"
    src = tiny_model("llama")
    digest = folder_digest(src)
    with pytest.raises(BadInputError) as info:
        apply(ApplyConfig(model=str(src), direction=files, out=out, **options))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not out.exists() and not leftovers(tmp_path)
    assert folder_digest(src) == digest


def test_one_direction_commands_refuse_spans(tiny_model, span_files):
    from orthoedit.model.direction import load_direction

    with pytest.raises(BadInputError, match="takes one direction"):
        load_direction(span_files[1], D_MODEL, N_LAYERS)


def test_op_basis_of_a_post_norm_writer_uses_the_gain(tiny_model, span_files):
    src = tiny_model("gemma2")
    plan, _ = apply(
        ApplyConfig(model=str(src), direction=span_files, out=src / "unused", dry_run=True)
    )
    source = Checkpoint.open(src)
    op = next(op for op in plan.ops if op.norm is not None)
    gain = source.read(op.norm) + op.norm_offset
    q = op_basis(op, plan, source)
    assert np.allclose(q @ q.T, np.eye(3), atol=1e-12)
    raw = gain * np.asarray(plan.directions)
    # Same span as g ⊙ R: projecting g ⊙ R onto it changes nothing.
    assert np.allclose(raw @ q.T @ q, raw, atol=1e-10)
