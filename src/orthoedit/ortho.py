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


def orthogonalize(
    weight: np.ndarray, u: np.ndarray, axis: int, scale: float = 1.0, preserve_norm: bool = False
) -> np.ndarray:
    """Return a float64 copy of ``weight`` with ``scale`` of its component along u removed.

    weight: any shape with ``weight.shape[axis] == u.size``; u: [d_model], unit norm. With
    ``preserve_norm`` every vector along the residual axis (a column of ``[d_model, in]``, a
    row of an embedding) is then scaled back to its original length (``--method
    norm-preserving``). The in-memory reference for the streaming writer.
    """
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, -1)  # [..., d_model]
    uu = np.asarray(u, dtype=np.float64)
    along = w @ uu
    out = w - scale * along[..., None] * uu
    if preserve_norm:
        out *= norm_factors(np.einsum("...i,...i->...", w, w), along, scale)[..., None]
    return np.moveaxis(out, -1, axis)


def norm_factors(sq: np.ndarray, along: np.ndarray, scale: float) -> np.ndarray:
    """Per vector, original length / length after the projection, from its squared length
    ``sq`` and its component ``along`` u: ``‖w − s(uᵀw)u‖² = ‖w‖² − (2s − s²)(uᵀw)²``. A
    vector that was (almost) all along u stays as projected (factor 1)."""
    after = np.maximum(sq - (2 * scale - scale * scale) * along * along, 0.0)
    ok = after > 1e-12 * sq
    return np.where(ok, np.sqrt(sq / np.where(ok, after, 1.0)), 1.0).astype(along.dtype)


def remove_rows_(chunk: np.ndarray, u: np.ndarray, scale: float, preserve_norm: bool = False):
    """In place, for rows that are independent writers (embedding rows, Conv1D rows).

    chunk: [rows, d_model]; each row loses ``scale`` of its component along u (and is scaled
    back to its length with ``preserve_norm``).
    """
    along = chunk @ u
    sq = np.einsum("ij,ij->i", chunk, chunk) if preserve_norm else None
    chunk -= np.multiply.outer(along * scale, u)
    if preserve_norm:
        chunk *= norm_factors(sq, along, scale)[:, None]


def column_coefficients(chunk: np.ndarray, u_rows: np.ndarray) -> np.ndarray:
    """First pass over a row-major ``[d_model, in]`` weight: this chunk's share of ``uᵀW``.

    chunk: [rows, in] (rows i0:i1 of W), u_rows: [rows] (u[i0:i1]); returns [in].
    """
    return u_rows @ chunk


def remove_columns_(
    chunk: np.ndarray,
    u_rows: np.ndarray,
    coeff: np.ndarray,
    scale: float,
    factors: np.ndarray | None = None,
):
    """Second pass: ``W[i0:i1] -= scale · u[i0:i1] ⊗ (uᵀW)``, in place, then each column
    times ``factors`` (from ``norm_factors`` over the whole columns) when given."""
    chunk -= np.multiply.outer(u_rows * scale, coeff)
    if factors is not None:
        chunk *= factors
