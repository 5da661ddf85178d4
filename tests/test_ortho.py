"""The pure projection math."""

from __future__ import annotations

import pytest
import torch

from orthoedit.ortho import (
    column_coefficients,
    orthogonalize,
    post_norm_unit,
    project_out,
    remove_columns_,
    remove_rows_,
    unit,
)

gen = torch.Generator().manual_seed(0)


def _u(d: int = 16) -> torch.Tensor:
    return unit(torch.randn(d, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("axis, shape", [(0, (16, 24)), (1, (24, 16)), (0, (16,))])
def test_orthogonalize_removes_component(axis, shape):
    u = _u()
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    out = orthogonalize(w, u, axis)
    assert (out.movedim(axis, -1) @ u).abs().max() < 1e-12
    assert (w.movedim(axis, -1) @ u).abs().max() > 1e-2  # there was something to remove
    # Only the component along u changed: the rest is untouched.
    rest = lambda t: t.movedim(axis, -1) - (t.movedim(axis, -1) @ u).unsqueeze(-1) * u  # noqa: E731
    assert torch.allclose(rest(out), rest(w), atol=1e-12)
    assert torch.allclose(orthogonalize(out, u, axis), out, atol=1e-12)  # idempotent


def test_scale_keeps_fraction_of_component():
    u = _u()
    w = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    out = orthogonalize(w, u, axis=0, scale=0.25)
    assert torch.allclose(u @ out, 0.75 * (u @ w), atol=1e-12)
    assert torch.equal(orthogonalize(w, u, axis=0, scale=0.0), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_preserved_and_math_upcast(dtype):
    u = _u()
    w = torch.randn(16, 8, generator=gen).to(dtype)
    out = orthogonalize(w, u, axis=0)
    assert out.dtype == dtype
    exact = orthogonalize(w.double(), u, axis=0)
    step = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (out.double() - exact).abs().max() <= step * w.double().abs().max()


def test_chunked_two_pass_equals_one_shot():
    u = _u(16)
    w = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    coeff = sum(column_coefficients(w[i : i + 5], u[i : i + 5]) for i in range(0, 16, 5))
    out = w.clone()
    for i in range(0, 16, 5):
        remove_columns_(out[i : i + 5], u[i : i + 5], coeff, 1.0)
    assert torch.allclose(out, orthogonalize(w, u, axis=0), atol=1e-12)
    rows = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    expect = orthogonalize(rows, u, axis=1)
    for i in range(0, 30, 7):
        remove_rows_(rows[i : i + 7], u, 1.0)
    assert torch.allclose(rows, expect, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_post_norm_unit_makes_normed_contribution_orthogonal(offset):
    """g ⊙ y / rms(y) has no component along r once y is projected along u ∝ g ⊙ r."""
    r = torch.randn(16, generator=gen, dtype=torch.float64)
    weight = torch.randn(16, generator=gen, dtype=torch.float64) * 0.5
    u = post_norm_unit(r, weight, offset)
    y = torch.randn(10, 16, generator=gen, dtype=torch.float64)

    def contribution(t):
        return (offset + weight) * t / t.pow(2).mean(-1, keepdim=True).sqrt()

    assert (contribution(project_out(y, u)) @ r).abs().max() < 1e-12
    # Projecting along r itself would not do it: the gain rotates the direction.
    assert (contribution(project_out(y, unit(r))) @ r).abs().max() > 1e-3
