"""The pure projection math and the storage codecs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orthoedit.edit.ortho import (
    column_coefficients,
    orthogonalize,
    post_norm_unit,
    remove_columns_,
    remove_rows_,
    unit,
)
from orthoedit.model.checkpoint import decode, encode

rng = np.random.default_rng(0)


def _u(d: int = 16) -> np.ndarray:
    return unit(rng.standard_normal(d))


def _project_out(x: np.ndarray, u: np.ndarray) -> np.ndarray:
    return x - np.multiply.outer(x @ u, u)


@pytest.mark.parametrize("axis, shape", [(0, (16, 24)), (1, (24, 16)), (0, (16,))])
def test_orthogonalize_removes_component(axis, shape):
    u = _u()
    w = rng.standard_normal(shape)
    out = orthogonalize(w, u, axis)
    assert np.abs(np.moveaxis(out, axis, -1) @ u).max() < 1e-12
    assert np.abs(np.moveaxis(w, axis, -1) @ u).max() > 1e-2  # there was something to remove
    # Only the component along u changed: the rest is untouched.
    rest = lambda t: _project_out(np.moveaxis(t, axis, -1), u)  # noqa: E731
    assert np.allclose(rest(out), rest(w), atol=1e-12)
    assert np.allclose(orthogonalize(out, u, axis), out, atol=1e-12)  # idempotent


def test_scale_keeps_fraction_of_component():
    u = _u()
    w = rng.standard_normal((16, 8))
    out = orthogonalize(w, u, axis=0, scale=0.25)
    assert np.allclose(u @ out, 0.75 * (u @ w), atol=1e-12)
    assert np.array_equal(orthogonalize(w, u, axis=0, scale=0.0), w)


def test_chunked_two_pass_equals_one_shot():
    u = _u(16)
    w = rng.standard_normal((16, 40))
    coeff = sum(column_coefficients(w[i : i + 5], u[i : i + 5]) for i in range(0, 16, 5))
    out = w.copy()
    for i in range(0, 16, 5):
        remove_columns_(out[i : i + 5], u[i : i + 5], coeff, 1.0)
    assert np.allclose(out, orthogonalize(w, u, axis=0), atol=1e-12)
    rows = rng.standard_normal((30, 16))
    expect = orthogonalize(rows, u, axis=1)
    for i in range(0, 30, 7):
        remove_rows_(rows[i : i + 7], u, 1.0)
    assert np.allclose(rows, expect, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_post_norm_unit_makes_normed_contribution_orthogonal(offset):
    """g ⊙ y / rms(y) has no component along r once y is projected along u ∝ g ⊙ r."""
    r = rng.standard_normal(16)
    weight = rng.standard_normal(16) * 0.5
    u = post_norm_unit(r, weight, offset)
    y = rng.standard_normal((10, 16))

    def contribution(t):
        return (offset + weight) * t / np.sqrt((t**2).mean(-1, keepdims=True))

    assert np.abs(contribution(_project_out(y, u)) @ r).max() < 1e-12
    # Projecting along r itself would not do it: the gain rotates the direction.
    assert np.abs(contribution(_project_out(y, unit(r))) @ r).max() > 1e-3


@pytest.mark.parametrize(
    "name, dtype", [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)]
)
def test_codecs_match_torch(name, dtype):
    """decode is an exact upcast; encode rounds to nearest even, bit for bit like torch."""
    values = torch.randn(4096, dtype=torch.float64) * 3
    # zeros, a subnormal, fp16 max, infinities and NaN
    values[:7] = torch.tensor([0.0, -0.0, 1e-40, 65504.0, float("inf"), -float("inf"), torch.nan])
    stored = values.to(dtype)
    raw = stored.view(torch.uint8).numpy()
    math = np.float64 if name == "F32" else np.float32
    decoded = decode(raw, name, math)
    assert decoded.dtype == math
    assert np.array_equal(decoded, stored.to(torch.float64).numpy(), equal_nan=True)
    wide = values.to(torch.float32)  # a float32 result of the math, rounded once to storage
    wide.view(torch.int32)[7] = 0x7FFFFFFF  # a NaN whose round-up would carry into the sign
    # NaN stays NaN (torch and numpy pick different NaN bits); every other value bit for bit.
    nan = np.isnan(wide.numpy())
    expect = wide.to(dtype)[~torch.from_numpy(nan)].view(torch.uint8).numpy()
    got = encode(wide.numpy().astype(math), name)
    assert np.isnan(got.astype(np.float32)[nan]).all()
    assert np.array_equal(got[~nan].view(np.uint8), expect)
    # Row blocks are 2-D: the codec must not depend on the shape.
    blocks = encode(wide.numpy().astype(math).reshape(64, 64), name).reshape(-1)
    assert np.array_equal(blocks[~nan].view(np.uint8), expect)
