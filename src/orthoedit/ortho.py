"""The projection math, pure and tiny: no files, no models, no torch (numpy only).

A writer W adds ``W x`` (or a row of W, for embeddings) into the residual stream; its residual
axis is the axis of length d_model. Orthogonalizing against a unit vector u with scale s is
``W' = W - s u (uᵀ W)`` along that axis, so every output ``y' = y - s u (uᵀ y)``.
Run-time projection of activations (torch) lives with the hooks.
"""

from __future__ import annotations

import numpy as np

#: Storage dtype (safetensors name) -> dtype the projection is computed in.
MATH_DTYPE: dict[str, type[np.floating]] = {
    "F32": np.float64,
    "F16": np.float32,
    "BF16": np.float32,
}


def unit(vector: np.ndarray) -> np.ndarray:
    """``vector / ‖vector‖`` in float64."""
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def post_norm_unit(r: np.ndarray, norm_weight: np.ndarray, offset: float) -> np.ndarray:
    """Unit vector to project a post-norm writer against (DESIGN idea 2).

    The writer's contribution is ``g ⊙ y / rms(y)`` with gain ``g = offset + weight``; its
    component along r is ``(g ⊙ r)ᵀ y / rms(y)``, so ``uᵀ y = 0`` with ``u ∝ g ⊙ r`` makes the
    contribution exactly orthogonal to r.
    """
    gain = np.asarray(norm_weight, dtype=np.float64) + offset
    return unit(gain * np.asarray(r, dtype=np.float64))


def orthogonalize(weight: np.ndarray, u: np.ndarray, axis: int, scale: float = 1.0) -> np.ndarray:
    """Return a float64 copy of ``weight`` with ``scale`` of its component along u removed.

    weight: any shape with ``weight.shape[axis] == u.size``; u: [d_model], unit norm.
    The in-memory reference for the streaming writer.
    """
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, -1)  # [..., d_model]
    uu = np.asarray(u, dtype=np.float64)
    w = w - scale * (w @ uu)[..., None] * uu
    return np.moveaxis(w, -1, axis)


def remove_rows_(chunk: np.ndarray, u: np.ndarray, scale: float) -> None:
    """In place, for rows that are independent writers (embedding rows, Conv1D rows).

    chunk: [rows, d_model]; each row loses ``scale`` of its component along u.
    """
    chunk -= np.multiply.outer((chunk @ u) * scale, u)


def column_coefficients(chunk: np.ndarray, u_rows: np.ndarray) -> np.ndarray:
    """First pass over a row-major ``[d_model, in]`` weight: this chunk's share of ``uᵀW``.

    chunk: [rows, in] (rows i0:i1 of W), u_rows: [rows] (u[i0:i1]); returns [in].
    """
    return u_rows @ chunk


def remove_columns_(chunk: np.ndarray, u_rows: np.ndarray, coeff: np.ndarray, scale: float):
    """Second pass: ``W[i0:i1] -= scale · u[i0:i1] ⊗ (uᵀW)``, in place."""
    chunk -= np.multiply.outer(u_rows * scale, coeff)
