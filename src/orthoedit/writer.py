"""Streaming, header-preserving edit of safetensors shards (DESIGN idea 4).

Orthogonalization keeps every shape and dtype, so each output shard starts with the source
header byte for byte; unedited tensor bytes are copied (``copy_file_range`` where the kernel
has it) and planned tensors are rewritten in row chunks, so peak memory is one chunk.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, TensorInfo, read_range
from .ortho import MATH_DTYPE, column_coefficients, remove_columns_, remove_rows_
from .plan import EditOp, Plan, unit_vector

Progress = Callable[[int], None]
CHUNK_BYTES = 32 * 1024 * 1024  # of math-dtype working memory per chunk
COPY_BLOCK = 64 * 1024 * 1024


def copy_bytes(src: int, dst: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of fd ``src`` from ``offset`` to fd ``dst``."""
    end = offset + length
    if hasattr(os, "copy_file_range"):
        try:
            while offset < end:
                n = os.copy_file_range(src, dst, min(COPY_BLOCK, end - offset), offset)
                if n == 0:
                    raise OSError("source file ended early")
                offset += n
            return
        except OSError as err:
            if err.errno not in (18, 38, 22, 95):  # EXDEV, ENOSYS, EINVAL, EOPNOTSUPP
                raise
    while offset < end:
        block = os.pread(src, min(COPY_BLOCK, end - offset), offset)
        if not block:
            raise OSError("source file ended early")
        _write_all(dst, block)
        offset += len(block)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_tensor(fd: int, t: torch.Tensor) -> None:
    _write_all(fd, t.contiguous().view(torch.uint8).numpy())


def edit_tensor(info: TensorInfo, op: EditOp, u: torch.Tensor, dst: int) -> None:
    """Write the projected tensor to ``dst``, chunk by chunk, in its storage dtype."""
    math = MATH_DTYPE[info.torch_dtype]
    u = u.to(math)
    if len(info.shape) == 1:
        b = read_range(info, 0, info.nbytes).to(math)
        b -= op.scale * (b @ u) * u
        _write_tensor(dst, b.to(info.torch_dtype))
        return
    rows, cols = info.shape
    row_bytes = cols * info.torch_dtype.itemsize
    step = max(1, CHUNK_BYTES // (cols * math.itemsize))

    def chunk(i0: int, i1: int) -> torch.Tensor:
        return read_range(info, i0 * row_bytes, (i1 - i0) * row_bytes).view(i1 - i0, cols).to(math)

    if op.axis == 1:  # rows are independent writers: [vocab, d_model] or Conv1D [in, d_model]
        for i0 in range(0, rows, step):
            c = chunk(i0, min(rows, i0 + step))
            remove_rows_(c, u, op.scale)
            _write_tensor(dst, c.to(info.torch_dtype))
        return
    # [d_model, in], row-major: accumulate uᵀW over row chunks, then subtract u_i (uᵀW) per row.
    coeff = torch.zeros(cols, dtype=math)
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        coeff += column_coefficients(chunk(i0, i1), u[i0:i1])
    for i0 in range(0, rows, step):
        i1 = min(rows, i0 + step)
        c = chunk(i0, i1)
        remove_columns_(c, u[i0:i1], coeff, op.scale)
        _write_tensor(dst, c.to(info.torch_dtype))


def write_shard(
    src_path: Path,
    checkpoint: Checkpoint,
    ops: dict[str, EditOp],
    vectors: dict[str, torch.Tensor],
    dst_path: Path,
    progress: Progress | None = None,
) -> None:
    """One output shard: the source header verbatim, then bytes copied or projected."""
    shard = next(f for f in checkpoint.files if f.path == src_path)
    edited = sorted((t for t in shard.tensors.values() if t.name in ops), key=lambda t: t.start)
    with open(src_path, "rb", buffering=0) as src, open(dst_path, "xb", buffering=0) as dst:
        sfd, dfd = src.fileno(), dst.fileno()
        copy_bytes(sfd, dfd, 0, shard.data_start)  # length prefix + header, byte for byte
        pos = shard.data_start
        if progress:
            progress(pos)
        for info in edited:
            copy_bytes(sfd, dfd, pos, info.start - pos)
            if progress:
                progress(info.start - pos)
            edit_tensor(info, ops[info.name], vectors[info.name], dfd)
            if progress:
                progress(info.nbytes)
            pos = info.end
        copy_bytes(sfd, dfd, pos, shard.size - pos)
        if progress:
            progress(shard.size - pos)


def write_lm_head(embedding: TensorInfo, name: str, dst_path: Path) -> None:
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
    with open(embedding.file, "rb", buffering=0) as src, open(dst_path, "xb", buffering=0) as dst:
        _write_all(dst.fileno(), struct.pack("<Q", len(raw)) + raw)
        copy_bytes(src.fileno(), dst.fileno(), embedding.start, embedding.nbytes)


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
        write_shard(shard.path, checkpoint, ops, vectors, out / name, progress)
        weight_map.update({t: name for t in shard.tensors})
    if plan.write_lm_head:
        extra = "model-00002-of-00002.safetensors" if rename else "model-lm_head.safetensors"
        embedding = checkpoint.tensors[plan.tied_embedding]
        write_lm_head(embedding, plan.unembed_tensor, out / extra)
        if progress:
            progress(embedding.nbytes)
        weight_map[plan.unembed_tensor] = extra
    if checkpoint.index is not None and not plan.write_lm_head:
        shutil.copyfile(checkpoint.folder / INDEX_NAME, out / INDEX_NAME)
    elif plan.write_lm_head:
        index = dict(checkpoint.index or {})
        total = sum(f.size - f.data_start for f in checkpoint.files)
        if plan.write_lm_head:
            total += checkpoint.tensors[plan.tied_embedding].nbytes
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = total
        index["metadata"] = meta
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def total_bytes(plan: Plan, checkpoint: Checkpoint) -> int:
    """Bytes the edit will write (for progress bars)."""
    extra = checkpoint.tensors[plan.tied_embedding].nbytes if plan.write_lm_head else 0
    return sum(f.size for f in checkpoint.files) + extra
