"""The projection math, pure and tiny: no files, no models, no torch (numpy only).

A writer W adds ``W x`` (or a row of W, for embeddings) into the residual stream; its residual
axis is the axis of length d_model. Orthogonalizing against a unit vector u with scale s is
``W' = W - s u (uᵀ W)`` along that axis, so every output ``y' = y - s u (uᵀ y)``; against
several directions, an orthonormal basis U ``[k, d_model]`` of their span takes u's place:
``W' = W - s Uᵀ (U W)``.
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
    """Unit vector to project a post-norm writer against (docs/design.md §2).

    The writer's contribution is ``g ⊙ y / rms(y)`` with gain ``g = offset + weight``; its
    component along r is ``(g ⊙ r)ᵀ y / rms(y)``, so ``uᵀ y = 0`` with ``u ∝ g ⊙ r`` makes the
    contribution exactly orthogonal to r.
    """
    gain = np.asarray(norm_weight, dtype=np.float64) + offset
    return unit(gain * np.asarray(r, dtype=np.float64))


def orthogonalize(
    weight: np.ndarray,
    basis: np.ndarray,
    axis: int,
    scale: float = 1.0,
    preserve_norm: bool = False,
) -> np.ndarray:
    """Return a float64 copy of ``weight`` with ``scale`` of its component in span(U) removed.

    weight: any shape with ``weight.shape[axis] == d_model``; basis U: ``[k, d_model]`` with
    orthonormal rows (or one unit vector ``[d_model]``): ``W' = W − s Uᵀ(U W)`` along the
    axis. With ``preserve_norm`` every vector along the residual axis (a column of
    ``[d_model, in]``, a row of an embedding) is then scaled back to its original length
    (``--method norm-preserving``). The in-memory reference for the streaming writer.
    """
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, -1)  # [..., d_model]
    q = np.atleast_2d(np.asarray(basis, dtype=np.float64))  # [k, d_model]
    along = w @ q.T  # [..., k]
    out = w - scale * along @ q
    if preserve_norm:
        sq = np.einsum("...i,...i->...", w, w)
        out *= norm_factors(sq, np.einsum("...k,...k->...", along, along), scale)[..., None]
    return np.moveaxis(out, -1, axis)


def norm_factors(sq: np.ndarray, along_sq: np.ndarray, scale: float) -> np.ndarray:
    """Per vector, original length / length after the projection, from its squared length
    ``sq`` and the squared length ``along_sq`` of its component in the span:
    ``‖w − sPw‖² = ‖w‖² − (2s − s²)‖Pw‖²``. A vector that was (almost) all in the span stays
    as projected (factor 1)."""
    after = np.maximum(sq - (2 * scale - scale * scale) * along_sq, 0.0)
    ok = after > 1e-12 * sq
    return np.where(ok, np.sqrt(sq / np.where(ok, after, 1.0)), 1.0).astype(along_sq.dtype)


def remove_rows_(chunk: np.ndarray, basis: np.ndarray, scale: float, preserve_norm: bool = False):
    """In place, for rows that are independent writers (embedding rows, Conv1D rows).

    chunk: [rows, d_model], basis: [k, d_model] orthonormal (or one unit vector); each row
    loses ``scale`` of its component in the span (and is scaled back to its length with
    ``preserve_norm``). One matrix-vector and one outer product per basis vector, every
    component taken from the rows before any is removed: skinny matrix products (k of a few)
    run far slower than that in BLAS.
    """
    basis = np.atleast_2d(basis)
    alongs = [chunk @ u for u in basis]  # each [rows]
    sq = np.einsum("ij,ij->i", chunk, chunk) if preserve_norm else None
    for u, along in zip(basis, alongs, strict=True):
        chunk -= np.multiply.outer(along * scale, u)
    if preserve_norm:
        chunk *= norm_factors(sq, sum(a * a for a in alongs), scale)[:, None]


def column_coefficients(chunk: np.ndarray, basis_rows: np.ndarray) -> np.ndarray:
    """First pass over a row-major ``[d_model, in]`` weight: this chunk's share of ``U W``.

    chunk: [rows, in] (rows i0:i1 of W), basis_rows: [k, rows] (``U[:, i0:i1]``; or [rows]
    for one vector); returns [k, in] ([in]).
    """
    if np.ndim(basis_rows) == 1:
        return basis_rows @ chunk
    return np.stack([u @ chunk for u in basis_rows])


def remove_columns_(
    chunk: np.ndarray,
    basis_rows: np.ndarray,
    coeff: np.ndarray,
    scale: float,
    factors: np.ndarray | None = None,
):
    """Second pass: ``W[i0:i1] -= scale · U[:, i0:i1]ᵀ (U W)``, in place (an outer product per
    basis vector), then each column times ``factors`` (from ``norm_factors`` over the whole
    columns) when given."""
    for u, c in zip(np.atleast_2d(basis_rows), np.atleast_2d(coeff), strict=True):
        chunk -= np.multiply.outer(u * scale, c)
    if factors is not None:
        chunk *= factors


def row_blocks(rows: int, step: int) -> list[tuple[int, int]]:
    """Half-open row ranges of ``step`` rows (the last one shorter) covering ``rows``."""
    return [(i0, min(rows, i0 + step)) for i0 in range(0, rows, step)]


def column_pass(load, rows: int, cols: int, tile: int, q, scale: float, preserve_norm: bool):
    """The first pass of a ``[d_model, in]`` weight: ``U W`` over every tile of rows
    (``load(i0, i1)``), and with ``preserve_norm`` the column norms' factors (else None)."""
    coeff = np.zeros((q.shape[0], cols), dtype=q.dtype)
    sq = np.zeros(cols, dtype=q.dtype) if preserve_norm else None
    for i0, i1 in row_blocks(rows, tile):
        block = load(i0, i1)
        coeff += column_coefficients(block, q[:, i0:i1])
        if preserve_norm:
            sq += np.einsum("ij,ij->j", block, block)
    if not preserve_norm:
        return coeff, None
    return coeff, norm_factors(sq, np.einsum("kj,kj->j", coeff, coeff), scale)
