"""Writing an edited GGUF in one streaming pass (docs/design.md §4).

The output is the source with the planned tensors requantized: the header's counts, the
metadata's bytes verbatim plus orthoedit's provenance keys, the tensor infos (offsets moved by
the new keys, types changed only where a tensor falls back to Q8_0), and the data: unedited
tensors copied byte for byte (``copy_file_range`` on a second thread), edited ones dequantized,
projected and requantized a block of rows at a time, so memory stays about one row block.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..model.gguf import GgufCheckpoint, GgufLayout, GgufTensor, dequantized
from . import feedback, gguf_types
from .ortho import row_blocks
from .plan import EditOp, Plan, op_basis
from .writer import OnBytes, _projected_vector, _write_all, copy_bytes

BLOCK_BYTES = 32 * 1024 * 1024  # float rows dequantized, projected and requantized at once
WORKERS = feedback.WORKERS
_POOL = feedback.POOL
_STRING = 8


@dataclass(frozen=True)
class Entry:
    """One output tensor: where its data comes from and what it becomes."""

    name: str
    source: GgufTensor
    kind: str  # the output type
    nbytes: int
    ops: tuple[tuple[int | None, EditOp], ...] = ()  # (expert or None, op) edits


def entries(plan: Plan, ckpt: GgufCheckpoint) -> tuple[list[Entry], list[str]]:
    """The output tensors in order, and a note for each edited tensor written in another type
    (with its size change)."""
    edits: dict[str, list] = {}
    for op in plan.ops:
        tensor, expert = ckpt.source[op.tensor]
        edits.setdefault(tensor.name, []).append((expert, op))
    out, retyped = [], {}
    for tensor in ckpt.layout.tensors:
        ops = tuple(edits.get(tensor.name, ()))
        if not ops:
            out.append(Entry(tensor.name, tensor, tensor.type_name, tensor.nbytes))
            continue
        kind, how = gguf_types.target(tensor.type_name, tensor.shape[-1])
        rows = int(np.prod(tensor.shape[:-1]))
        nbytes = rows * gguf_types.row_bytes(kind, tensor.shape[-1])
        if kind != tensor.type_name:
            retyped.setdefault((kind, how), []).append((tensor.type_name, tensor.nbytes, nbytes))
        out.append(Entry(tensor.name, tensor, kind, nbytes, ops))
    notes = [_note(kind, how, found) for (kind, how), found in retyped.items()]
    if plan.write_lm_head:  # untie: the output matrix is the original embedding
        embedding = ckpt.source[plan.tied_embedding][0]
        out.append(Entry("output.weight", embedding, embedding.type_name, embedding.nbytes))
    return out, notes


def _note(kind: str, how: str, found: list[tuple[str, int, int]]) -> str:
    """One line for the edited tensors written in ``kind`` instead of their own type."""
    counts: dict[str, int] = {}
    for source, _, _ in found:
        counts[source] = counts.get(source, 0) + 1
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    before, after = sum(f[1] for f in found), sum(f[2] for f in found)
    return (
        f"{len(found)} edited tensors ({types}) written as {kind}: {how}; "
        f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB"
    )


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def _tensor_info(entry: Entry, offset: int) -> bytes:
    from gguf import GGMLQuantizationType

    ne = list(reversed(entry.source.shape))
    raw = _string(entry.name) + struct.pack("<I", len(ne))
    raw += struct.pack(f"<{len(ne)}Q", *ne)
    return raw + struct.pack("<IQ", GGMLQuantizationType[entry.kind].value, offset)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def header(layout: GgufLayout, out: list[Entry], keys: dict[str, str]) -> tuple[bytes, list[int]]:
    """Everything before the tensor data (padded), and each entry's absolute data offset."""
    offsets, pos = [], 0
    for entry in out:
        offsets.append(pos)
        pos = _align(pos + entry.nbytes, layout.alignment)
    head = b"GGUF" + struct.pack("<IQQ", layout.version, len(out), layout.kv_count + len(keys))
    head += layout.kv_bytes + b"".join(_kv(k, v) for k, v in keys.items())
    head += b"".join(_tensor_info(e, o) for e, o in zip(out, offsets, strict=True))
    head += b"\0" * (_align(len(head), layout.alignment) - len(head))
    return head, [len(head) + o for o in offsets]


def write_gguf(
    plan: Plan,
    ckpt: GgufCheckpoint,
    keys: dict[str, str],
    dst: Path,
    progress: OnBytes | None = None,
) -> list[Entry]:
    """Write the edited GGUF to ``dst`` (a new file). Returns the output tensors."""
    out, _ = entries(plan, ckpt)
    head, offsets = header(ckpt.layout, out, keys)
    preserve = plan.method == "norm-preserving"
    stop = threading.Event()
    with (
        open(ckpt.layout.path, "rb", buffering=0) as src,
        open(dst, "xb", buffering=0) as f,
        ThreadPoolExecutor(1) as copier,
    ):
        _write_all(f.fileno(), head, 0)
        end = offsets[-1] + out[-1].nbytes
        os.ftruncate(f.fileno(), _align(end, ckpt.layout.alignment))
        copies = []
        for entry, offset in zip(out, offsets, strict=True):
            if not entry.ops:
                copies.append(
                    copier.submit(copy_bytes, src.fileno(), f.fileno(), entry.source.start,
                                  entry.nbytes, stop, offset)
                )  # fmt: skip
        try:
            for entry, offset in zip(out, offsets, strict=True):
                if entry.ops:
                    _edit(plan, ckpt, entry, f.fileno(), offset, preserve, progress)
            for job in copies:
                job.result()
        finally:
            stop.set()
        if progress:
            progress(sum(e.nbytes for e in out if not e.ops))
    return out


def _edit(plan, ckpt, entry: Entry, fd: int, offset: int, preserve: bool, progress) -> None:
    """One edited tensor, each expert (or the whole tensor) in turn, written at ``offset``."""
    tensor = entry.source
    per_expert = tensor.shape[-2] if len(tensor.shape) == 3 else 0
    out_row = gguf_types.row_bytes(entry.kind, tensor.shape[-1])
    for expert, op in entry.ops:
        basis = np.atleast_2d(op_basis(op, plan, ckpt))
        if len(tensor.shape) == 1:
            values = dequantized(ckpt.layout, tensor).reshape(-1).astype(np.float64)
            values = _projected_vector(values, basis, op.scale, preserve)
            _write_all(fd, gguf_types.quantize(values[None], entry.kind), offset)
            continue
        first = (expert or 0) * per_expert
        rows = per_expert if expert is not None else int(np.prod(tensor.shape[:-1]))
        _edit_rows(ckpt, tensor, first, rows, op, basis, entry.kind, preserve,
                   lambda data, r: _write_all(fd, data, offset + r * out_row))  # fmt: skip
        if progress:
            progress(rows * out_row)


def _edit_rows(ckpt, tensor, first, rows, op, basis, kind, preserve, write) -> None:
    """Rows ``first:first+rows`` of a tensor (one matrix): ``[d_model, in]`` (residual axis 0,
    a first pass for ``U W``) or independent rows (an embedding, residual axis 1). Row blocks
    run on every core (numpy and ggml release the GIL; each block is written at its offset).
    A quantized type is requantized with feedback (``feedback``: the leftover along the basis
    fed back into the target until it stops shrinking; the best pass is what stays)."""
    cols = tensor.shape[-1]
    math = np.float64 if tensor.type_name == "F32" else np.float32
    q = basis.astype(math)
    step = max(1, BLOCK_BYTES // (cols * np.dtype(math).itemsize) // WORKERS)
    exact = kind in gguf_types.FLOAT_KINDS

    def load(i0: int, i1: int) -> np.ndarray:
        block = dequantized(ckpt.layout, tensor, slice(first + i0, first + i1))
        return block.astype(math, copy=False)

    def requantize(values: np.ndarray):
        data = gguf_types.quantize(values, kind)
        return data, None if exact else _back(data, kind, values.dtype)

    blocks = row_blocks(rows, step)
    if (op.axis if len(tensor.shape) == 2 else op.axis - 1) == 1:
        rows_job = partial(_independent_rows, load, q, op.scale, preserve, requantize, write, first)
        list(_POOL.map(rows_job, blocks))
        return

    def rounded(block: np.ndarray, i0: int):
        data, back = requantize(block)
        write(data, first + i0)
        return back

    feedback.columns(load, blocks, q, op.scale, preserve, rounded, map_=_POOL.map)


def _independent_rows(load, q, scale, preserve, requantize, write, first, block_range) -> None:
    """Rows that are writers each (an embedding's): projected, then requantized with feedback
    within the block."""
    i0, i1 = block_range
    write(feedback.rows(load(i0, i1), q, scale, preserve, requantize), first + i0)


def _back(data: np.ndarray, kind: str, dtype) -> np.ndarray:
    """Quantized rows dequantized again, in ``dtype``."""
    from gguf import GGMLQuantizationType, dequantize

    return np.asarray(dequantize(data, GGMLQuantizationType[kind]), dtype=dtype)
