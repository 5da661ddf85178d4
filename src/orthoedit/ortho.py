"""The projection math, pure and tiny: no files, no models.

A writer W adds ``W x`` (or a row of W, for embeddings) into the residual stream; its residual
axis is the axis of length d_model. Orthogonalizing against a unit vector u with scale s is
``W' = W - s u (uᵀ W)`` along that axis, so every output ``y' = y - s u (uᵀ y)``.
"""

from __future__ import annotations

import torch

#: Storage dtype -> dtype the projection is computed in (cast back to storage once).
MATH_DTYPE = {
    torch.float32: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector / ‖vector‖`` in float64."""
    v = vector.to(torch.float64)
    return v / v.norm()


def post_norm_unit(r: torch.Tensor, norm_weight: torch.Tensor, offset: float) -> torch.Tensor:
    """Unit vector to project a post-norm writer against (DESIGN idea 2).

    The writer's contribution is ``g ⊙ y / rms(y)`` with gain ``g = offset + weight``; its
    component along r is ``(g ⊙ r)ᵀ y / rms(y)``, so ``uᵀ y = 0`` with ``u ∝ g ⊙ r`` makes the
    contribution exactly orthogonal to r.
    """
    gain = norm_weight.to(torch.float64) + offset
    return unit(gain * r.to(torch.float64))


def orthogonalize(
    weight: torch.Tensor, u: torch.Tensor, axis: int, scale: float = 1.0
) -> torch.Tensor:
    """Return ``weight`` with ``scale`` of its component along u removed on ``axis``.

    weight: any shape with ``weight.shape[axis] == u.numel()``; u: [d_model], unit norm.
    Computed in float64/float32 (see MATH_DTYPE) and cast back to weight.dtype once.
    """
    math = MATH_DTYPE.get(weight.dtype, torch.float64)
    w = weight.to(math).movedim(axis, -1)  # [..., d_model]
    uu = u.to(math)
    w = w - scale * (w @ uu).unsqueeze(-1) * uu
    return w.movedim(-1, axis).to(weight.dtype)


def remove_rows_(chunk: torch.Tensor, u: torch.Tensor, scale: float) -> None:
    """In place, for rows that are independent writers (embedding rows, Conv1D rows).

    chunk: [rows, d_model] in math dtype; each row loses ``scale`` of its component along u.
    """
    chunk.addr_(chunk @ u, u, alpha=-scale)


def column_coefficients(chunk: torch.Tensor, u_rows: torch.Tensor) -> torch.Tensor:
    """First pass over a row-major ``[d_model, in]`` weight: this chunk's share of ``uᵀW``.

    chunk: [rows, in] (rows i0:i1 of W), u_rows: [rows] (u[i0:i1]); returns [in].
    """
    return u_rows @ chunk


def remove_columns_(chunk: torch.Tensor, u_rows: torch.Tensor, coeff: torch.Tensor, scale: float):
    """Second pass: ``W[i0:i1] -= scale · u[i0:i1] ⊗ (uᵀW)``, in place."""
    chunk.addr_(u_rows, coeff, alpha=-scale)


def project_out(x: torch.Tensor, u: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Activations ``x: [..., d_model]`` minus ``scale`` of their component along u (hooks)."""
    uu = u.to(x.dtype)
    return x - scale * (x @ uu).unsqueeze(-1) * uu
