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
CHUNK_BYTES = 16 * 1024 * 1024  # math-dtype working set of one row block
ONE_PASS_BYTES = 64 * 1024 * 1024  # a [d_model, in] weight up to this size is read once
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


def _blocks(rows: int, step: int) -> list[tuple[int, int]]:
    return [(i0, min(rows, i0 + step)) for i0 in range(0, rows, step)]


def edit_tasks(
    shard: SafetensorsFile, info: TensorInfo, op: EditOp, u: np.ndarray, dst: int
) -> list[Callable[[], None]]:
    """Independent jobs that together write the projected tensor at its offset in ``dst``.

    Rows of an embedding (or a Conv1D ``[in, d_model]``) are independent writers, so each row
    block is its own job; a row-major ``[d_model, in]`` weight needs ``uᵀW`` from every row
    first: one job, one read if it fits in ``ONE_PASS_BYTES``, else two passes over row blocks.
    """
    math = MATH_DTYPE[info.dtype]
    u = u.astype(math)
    raw = shard.bytes(info)
    if len(info.shape) == 1:

        def bias() -> None:
            b = decode(raw, info.dtype, math)
            b -= op.scale * (b @ u) * u
            _write_all(dst, encode_values(b, info.dtype), info.start)

        return [bias]
    rows, cols = info.shape
    row_bytes = cols * info.itemsize
    matrix = raw.reshape(rows, row_bytes)
    step = max(1, CHUNK_BYTES // (cols * np.dtype(math).itemsize))

    def read(i0: int, i1: int) -> np.ndarray:
        return decode(matrix[i0:i1], info.dtype, math).reshape(i1 - i0, cols)

    def put(values: np.ndarray, i0: int) -> None:
        _write_all(dst, encode_values(values, info.dtype), info.start + i0 * row_bytes)

    if op.axis == 1:

        def rows_job(i0: int, i1: int) -> Callable[[], None]:
            def job() -> None:
                block = read(i0, i1)
                remove_rows_(block, u, op.scale)
                put(block, i0)

            return job

        return [rows_job(i0, i1) for i0, i1 in _blocks(rows, step)]

    def columns_job() -> None:
        blocks = _blocks(rows, step)
        if rows * cols * np.dtype(math).itemsize <= ONE_PASS_BYTES:
            w = read(0, rows)
            coeff = column_coefficients(w, u)
            for i0, i1 in blocks:  # subtract block by block: temporaries stay one block
                remove_columns_(w[i0:i1], u[i0:i1], coeff, op.scale)
            put(w, 0)
            return
        coeff = np.zeros(cols, dtype=math)
        for i0, i1 in blocks:
            coeff += column_coefficients(read(i0, i1), u[i0:i1])
        for i0, i1 in blocks:
            block = read(i0, i1)
            remove_columns_(block, u[i0:i1], coeff, op.scale)
            put(block, i0)

    return [columns_job]


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
    """One output shard: header and unedited bytes copied, planned tensors projected.

    The kernel copies the unedited ranges on a second thread while this one edits; every
    write lands at its own offset, so order does not matter.
    """
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
            copying = pool.submit(copy_all)
            try:
                # Edits stay on this thread: one malloc arena, so freed blocks are reused and
                # peak memory is one job's working set (a second edit thread measured no
                # faster on 2 cores and held a second arena).
                for info in edited:
                    for job in edit_tasks(shard, info, ops[info.name], vectors[info.name], dfd):
                        job()
                    if progress:
                        progress(info.nbytes)
            except BaseException:
                stop.set()  # end the copy early; the caller removes the output
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
