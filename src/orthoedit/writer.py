"""Streaming, header-preserving edit of safetensors shards (DESIGN idea 4).

Orthogonalization keeps every shape and dtype, so each output shard is the source shard with
only the planned tensors' bytes replaced, at the same offsets: the header and every unedited
byte are copied (``copy_file_range`` where the kernel has it, on a second thread), and planned
tensors are rewritten in row chunks from a memory map, so peak memory is one chunk. The math is
numpy: apply never imports torch, whose start-up alone costs more than copying a GB.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, SafetensorsFile, TensorInfo, decode
from .checkpoint import encode as encode_values
from .ortho import MATH_DTYPE, column_coefficients, remove_columns_, remove_rows_
from .plan import EditOp, Plan, unit_vector

Progress = Callable[[int], None]
CHUNK_BYTES = 64 * 1024 * 1024  # math-dtype working set per chunk
COPY_BLOCK = 64 * 1024 * 1024
_NO_OFFLOAD = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _write_all(fd: int, data, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset``."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_bytes(src: int, dst: int, offset: int, length: int, stop: threading.Event) -> None:
    """Copy ``[offset, offset + length)`` of fd ``src`` to the same offset of fd ``dst``."""
    end = offset + length
    if hasattr(os, "copy_file_range"):
        try:
            while offset < end and not stop.is_set():
                n = os.copy_file_range(src, dst, min(COPY_BLOCK, end - offset), offset, offset)
                if n == 0:
                    raise OSError(errno.EIO, "source file ended early")
                offset += n
            return
        except OSError as err:
            if err.errno not in _NO_OFFLOAD:
                raise
    while offset < end and not stop.is_set():
        block = os.pread(src, min(COPY_BLOCK, end - offset), offset)
        if not block:
            raise OSError(errno.EIO, "source file ended early")
        _write_all(dst, block, offset)
        offset += len(block)


def edit_tensor(
    shard: SafetensorsFile, info: TensorInfo, op: EditOp, u: np.ndarray, dst: int
) -> None:
    """Write the projected tensor at its own offset in ``dst``, chunk by chunk."""
    math = MATH_DTYPE[info.dtype]
    u = u.astype(math)
    raw = shard.bytes(info)

    def put(values: np.ndarray, row: int) -> None:
        _write_all(dst, encode_values(values, info.dtype), info.start + row * row_bytes)

    if len(info.shape) == 1:
        row_bytes = 0
        b = decode(raw, info.dtype, math)
        b -= op.scale * (b @ u) * u
        put(b, 0)
        return
    rows, cols = info.shape
    row_bytes = cols * info.itemsize
    step = max(1, CHUNK_BYTES // (cols * np.dtype(math).itemsize))
    matrix = raw.reshape(rows, row_bytes)

    def chunk(i0: int, i1: int) -> np.ndarray:
        return decode(matrix[i0:i1], info.dtype, math).reshape(i1 - i0, cols)

    if op.axis == 1:  # rows are independent writers: [vocab, d_model] or Conv1D [in, d_model]
        for i0 in range(0, rows, step):
            c = chunk(i0, min(rows, i0 + step))
            remove_rows_(c, u, op.scale)
            put(c, i0)
        return
    # [d_model, in], row-major: uᵀW needs every row before any row can be written.
    if rows <= step:  # fits in one chunk: one read
        w = chunk(0, rows)
        remove_columns_(w, u, column_coefficients(w, u), op.scale)
        put(w, 0)
        return
    coeff = np.zeros(cols, dtype=math)
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        coeff += column_coefficients(chunk(i0, i1), u[i0:i1])
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        c = chunk(i0, i1)
        remove_columns_(c, u[i0:i1], coeff, op.scale)
        put(c, i0)


def _unedited_spans(shard: SafetensorsFile, edited: list[TensorInfo]) -> list[tuple[int, int]]:
    """Byte ranges ``(start, length)`` of the shard that no planned tensor covers."""
    spans, pos = [], 0
    for info in edited:
        spans.append((pos, info.start - pos))
        pos = info.end
    spans.append((pos, shard.size - pos))
    return [(s, n) for s, n in spans if n > 0]


def write_shard(
    shard: SafetensorsFile,
    ops: dict[str, EditOp],
    vectors: dict[str, np.ndarray],
    dst_path: Path,
    progress: Progress | None = None,
) -> None:
    """One output shard: header and unedited bytes copied, planned tensors projected."""
    edited = sorted((t for t in shard.tensors.values() if t.name in ops), key=lambda t: t.start)
    spans = _unedited_spans(shard, edited)
    stop = threading.Event()

    def copy_all() -> None:
        for start, length in spans:
            copy_bytes(sfd, dfd, start, length, stop)
            if progress:
                progress(length)

    with open(shard.path, "rb", buffering=0) as src, open(dst_path, "xb", buffering=0) as dst:
        sfd, dfd = src.fileno(), dst.fileno()
        with ThreadPoolExecutor(1, thread_name_prefix="orthoedit-copy") as pool:
            copying = pool.submit(copy_all)  # the kernel copies while this thread computes
            try:
                for info in edited:
                    edit_tensor(shard, info, ops[info.name], vectors[info.name], dfd)
                    if progress:
                        progress(info.nbytes)
            except BaseException:
                stop.set()
                raise
            copying.result()


def write_lm_head(checkpoint: Checkpoint, embedding: TensorInfo, name: str, dst_path: Path):
    """A one-tensor shard holding ``name`` = the original embedding bytes (for untie)."""
    header = {
        "__metadata__": {"format": "pt"},
        name: {
            "dtype": embedding.dtype,
            "shape": list(embedding.shape),
            "data_offsets": [0, embedding.nbytes],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    prefix = struct.pack("<Q", len(raw)) + raw
    with open(dst_path, "xb", buffering=0) as dst:
        _write_all(dst.fileno(), prefix, 0)
        _write_all(dst.fileno(), checkpoint.shard(embedding).bytes(embedding), len(prefix))


def stream_edit(
    plan: Plan, checkpoint: Checkpoint, out: Path, progress: Progress | None = None
) -> dict[str, str]:
    """Write every shard of ``checkpoint`` into ``out`` with the plan applied.

    Returns the output weight map (tensor -> shard file name).
    """
    ops = {op.tensor: op for op in plan.ops}
    r = plan.r
    vectors = {name: unit_vector(op, r, checkpoint) for name, op in ops.items()}
    rename = {}
    if plan.write_lm_head and checkpoint.index is None:
        # transformers prefers model.safetensors over an index, so a single file must become
        # a sharded checkpoint once it gains a second shard.
        rename = {SINGLE_NAME: "model-00001-of-00002.safetensors"}
    weight_map: dict[str, str] = {}
    for shard in checkpoint.files:
        name = rename.get(shard.path.name, shard.path.name)
        write_shard(shard, ops, vectors, out / name, progress)
        weight_map.update({t: name for t in shard.tensors})
    if checkpoint.index is not None and not plan.write_lm_head:
        shutil.copyfile(checkpoint.folder / INDEX_NAME, out / INDEX_NAME)
    elif plan.write_lm_head:
        extra = "model-00002-of-00002.safetensors" if rename else "model-lm_head.safetensors"
        embedding = checkpoint.tensors[plan.tied_embedding]
        write_lm_head(checkpoint, embedding, plan.unembed_tensor, out / extra)
        if progress:
            progress(embedding.nbytes)
        weight_map[plan.unembed_tensor] = extra
        index = dict(checkpoint.index or {})
        total = sum(f.size - f.data_start for f in checkpoint.files) + embedding.nbytes
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def total_bytes(plan: Plan, checkpoint: Checkpoint) -> int:
    """Bytes the edit will write (for progress bars)."""
    extra = checkpoint.tensors[plan.tied_embedding].nbytes if plan.write_lm_head else 0
    return sum(f.size for f in checkpoint.files) + extra
