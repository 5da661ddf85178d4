"""Quantized weights edited in their own format (docs/design.md, "Quantized checkpoints").

A quantized weight is one or more matrices (an FP8 ``[rows, cols]`` weight; each expert of an
MXFP4 ``[experts, d_model, in]`` tensor), each with its grid of block scales. Rows are
dequantized to float32 in chunks of whole scale blocks, projected with the same math as float
weights (two passes when the rows are d_model), requantized with feedback (``feedback``; a
block keeps its stored scale while its values fit it) and written at their offsets: the weight
and its scale tensor keep their shapes, dtypes and places in the shard, so peak memory is one
chunk per thread, as for float weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..model.checkpoint import DTYPES, SafetensorsFile, TensorInfo
from ..model.quant import QuantFormat, decode, encode, logical_shape
from . import feedback
from .ortho import row_blocks
from .plan import EditOp

#: Float32 bytes of rows dequantized, projected and requantized at a time (whole blocks).
CHUNK_BYTES = 512 * 1024

#: Size in bytes of each scale dtype (MXFP4's E8M0 exponents are stored as U8).
SCALE_BYTES = {**DTYPES, "U8": 1}


@dataclass(frozen=True)
class QuantMatrix:
    """One matrix of a quantized tensor: its stored rows and scale rows (memory-mapped)."""

    fmt: QuantFormat
    q: np.ndarray  # uint8 [rows, row bytes]
    s: np.ndarray  # uint8 [scale rows, scale row bytes]
    q_start: int  # absolute file offset of row 0
    s_start: int  # absolute file offset of scale row 0
    cols: int  # dequantized columns
    scale_dtype: str

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def step(self) -> int:
        """Rows per chunk: whole scale blocks, about ``CHUNK_BYTES`` of float32."""
        bo = self.fmt.block[0]
        return max(1, CHUNK_BYTES // (self.cols * 4) // bo) * bo

    def load(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``i0:i1`` (``i0`` on a block boundary) as float32, with per-element scales."""
        bo = self.fmt.block[0]
        s = self.s[i0 // bo : -(-i1 // bo)]
        return decode(self.fmt, self.q[i0:i1], s, self.cols, self.scale_dtype)

    def encode(self, i0: int, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows from ``i0`` (whole scale blocks) requantized: (element bytes, scales'); a block
        keeps its stored scale while its elements fit its grid (``model.quant.encode``)."""
        bo = self.fmt.block[0]
        stored = self.s[i0 // bo : -(-(i0 + len(values)) // bo)]
        return encode(self.fmt, values, self.scale_dtype, stored)

    def decode(self, q: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``encode``'s bytes back to float32 rows."""
        return decode(self.fmt, q, s, self.cols, self.scale_dtype)[0]

    def place(
        self, i0: int, q: np.ndarray, s: np.ndarray
    ) -> tuple[int, np.ndarray, int, np.ndarray]:
        """Rows from ``i0`` as stored: (file offset, their bytes, offset, their scales')."""
        s_offset = self.s_start + i0 // self.fmt.block[0] * self.s.shape[1]
        return self.q_start + i0 * self.q.shape[1], q, s_offset, s


def matrices(
    fmt: QuantFormat, shard: SafetensorsFile, info: TensorInfo, scale_shard, scale_info
) -> Iterator[QuantMatrix]:
    """The matrices of a quantized tensor (one, or one per expert)."""
    shape = logical_shape(fmt, info.shape)
    count, rows, cols = int(np.prod(shape[:-2])), shape[-2], shape[-1]
    q = shard.bytes(info).reshape(count, rows, -1)
    s = scale_shard.bytes(scale_info).reshape(count, scale_info.shape[-2], -1)
    for e in range(count):
        yield QuantMatrix(
            fmt,
            q[e],
            s[e],
            info.start + e * q[e].size,
            scale_info.start + e * s[e].size,
            cols,
            scale_info.dtype,
        )


#: ``write(offset, bytes, scale offset, scale bytes)``: one requantized chunk, at its offsets.
Write = Callable[[int, np.ndarray, int, np.ndarray], None]


def requantize(
    fmt: QuantFormat,
    src: tuple[SafetensorsFile, TensorInfo],
    scales: tuple[SafetensorsFile, TensorInfo],
    op: EditOp,
    basis: np.ndarray,
    write: Write,
    preserve_norm: bool = False,
) -> None:
    """The projected tensor against ``basis`` ``[k, d_model]``, requantized chunk by chunk
    with feedback (``feedback``: the rounding's leftover along the basis fed back into the
    target, so that nearest rounding does not put the component back). Rows of d_model
    (``op.axis`` 0 of an FP8 ``[d_model, in]``; MXFP4 experts ``[experts, d_model, in]``) are
    rounded once per pass over all their chunks, every pass written and the best written last;
    independent rows (an FP8 embedding) a chunk at a time.

    The feedback stops below bfloat16's floor or half the component that the format's own
    rounding of a float weight leaves, ε‖W‖/√d_model (what verify bounds at twice that,
    ``verify.ROUNDING_MULTIPLE``), whichever is lower: FP8's beyond d_model 256, MXFP4's beyond
    4096."""
    q = np.atleast_2d(basis).astype(np.float32)
    columns = op.axis == 0 or fmt.method == "mxfp4"
    d_model = q.shape[1]
    floor = min(feedback.FLOOR, fmt.epsilon / (2 * d_model**0.5))
    for m in matrices(fmt, *src, *scales):
        blocks = row_blocks(m.rows, m.step)
        if columns:

            def rounded(block: np.ndarray, i0: int, m=m) -> np.ndarray:
                return m.decode(*_stored(m, i0, block, write))

            load = lambda i0, i1, m=m: m.load(i0, i1)[0]  # noqa: E731
            feedback.columns(load, blocks, q, op.scale, preserve_norm, rounded, floor=floor)
            continue
        for i0, i1 in blocks:

            def stored(values: np.ndarray, m=m, i0=i0):
                qs = m.encode(i0, values)
                return qs, m.decode(*qs)

            base = m.load(i0, i1)[0]
            qs = feedback.rows(base, q, op.scale, preserve_norm, stored, floor=floor)
            write(*m.place(i0, *qs))


def _stored(m: QuantMatrix, i0: int, values: np.ndarray, write: Write):
    """Rows of ``m`` from ``i0`` requantized and written; returns (elements, scales) bytes."""
    qs = m.encode(i0, values)
    write(*m.place(i0, *qs))
    return qs


def quantized_along(
    fmt: QuantFormat, src: tuple[SafetensorsFile, TensorInfo], scales, basis: np.ndarray, axis
):
    """Like ``Checkpoint.along_and_lengths`` on the dequantized tensor (float64 components in
    ``basis``, squared lengths of the vectors along the residual axis, the matrices' vectors
    one after the other), plus, per matrix (each expert of a fused tensor), the squared size of
    the component the format's own rounding could leave in the basis:
    ``Σ_k Σ_j Σ_i U_ki² δ_ij²`` with δ the largest rounding error of each element
    (``QuantFormat.rounding_bound``)."""
    q = np.atleast_2d(np.asarray(basis, dtype=np.float64))
    coeffs, sqs, bounds = [], [], []
    for m in matrices(fmt, *src, *scales):
        columns = axis == 0 or fmt.method == "mxfp4"
        coeff = np.zeros((q.shape[0], m.cols)) if columns else []
        sq = np.zeros(m.cols) if columns else []
        bound = 0.0
        for i0, i1 in row_blocks(m.rows, m.step):
            values, block_scales = m.load(i0, i1)
            delta2 = np.square(fmt.rounding_bound(values, block_scales), dtype=np.float64)
            w = values.astype(np.float64)
            if columns:
                coeff += q[:, i0:i1] @ w
                sq += np.einsum("ij,ij->j", w, w)
                bound += float(np.sum(np.square(q[:, i0:i1]) @ delta2))
            else:
                coeff.append(w @ q.T)
                sq.append(np.einsum("ij,ij->i", w, w))
                bound += float(np.sum(delta2 @ np.square(q).T))
        coeffs.append(coeff if columns else np.concatenate(coeff).T)
        sqs.append(sq if columns else np.concatenate(sq))
        bounds.append(bound)
    return np.concatenate(coeffs, axis=-1), np.concatenate(sqs), np.array(bounds)
