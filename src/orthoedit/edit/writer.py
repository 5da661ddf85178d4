"""Streaming, header-preserving edit of safetensors shards (docs/design.md §4).

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
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..model.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    SafetensorsFile,
    TensorInfo,
    encode,
    expert_slices,
    stored,
)
from ..model.quant import QuantFormat
from .ortho import (
    MATH_DTYPE,
    column_pass,
    norm_factors,
    remove_columns_,
    remove_rows_,
    row_blocks,
)
from .plan import EditOp, Plan, op_basis
from .requant import requantize

#: Told the bytes written since its last call (the streaming edit takes no progress display:
#: ``orthoedit.progress.Progress.advance`` or a rich bar's advance is passed in).
OnBytes = Callable[[int], None]
TILE_BYTES = 512 * 1024  # math-dtype rows decoded, projected and encoded while in cache
OUT_BYTES = 8 * 1024 * 1024  # stored-dtype rows written per pwrite
COPY_BLOCK = 64 * 1024 * 1024
_NO_OFFLOAD = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _write_all(fd: int, data, offset: int) -> None:
    """``pwrite`` all of ``data`` (bytes or a contiguous array) at ``offset``."""
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)  # buffers cannot export bfloat16
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def copy_bytes(
    src: int, dst: int, offset: int, length: int, stop: threading.Event, to: int | None = None
) -> None:
    """Copy ``[offset, offset + length)`` of fd ``src`` to fd ``dst`` at offset ``to`` (the
    same offset unless given)."""
    end, to = offset + length, offset if to is None else to
    if hasattr(os, "copy_file_range"):
        try:
            while offset < end and not stop.is_set():
                n = os.copy_file_range(src, dst, min(COPY_BLOCK, end - offset), offset, to)
                if n == 0:
                    raise OSError(errno.EIO, "source file ended early")
                offset, to = offset + n, to + n
            return
        except OSError as err:
            if err.errno not in _NO_OFFLOAD:
                raise
    while offset < end and not stop.is_set():
        block = os.pread(src, min(COPY_BLOCK, end - offset), offset)
        if not block:
            raise OSError(errno.EIO, "source file ended early")
        _write_all(dst, block, to)
        offset, to = offset + len(block), to + len(block)


class Workspace:
    """Buffers kept for the whole run, so no row block pays for fresh pages.

    Large numpy temporaries are mmap'ed and returned to the kernel on free; re-faulting them
    for every block cost more than the math (and on a ballooned VM, a host fault per page).
    """

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        need = int(np.prod(shape)) * dtype.itemsize
        flat = self._flat.get(key)
        if flat is None or flat.size < need:
            flat = self._flat[key] = np.empty(need, dtype=np.uint8)
        return flat[:need].view(dtype).reshape(shape)


def _projected_vector(b: np.ndarray, q: np.ndarray, scale: float, preserve_norm: bool):
    """A 1-D writer (a bias) with ``scale`` times its components along the rows of ``q``
    removed, in place."""
    along = np.array([u @ b for u in q])
    sq = b @ b
    for u, a in zip(q, along, strict=True):
        b -= scale * a * u
    if preserve_norm:
        b *= norm_factors(np.asarray(sq), np.asarray(along @ along), scale)
    return b


def edit_tensor(
    shard: SafetensorsFile,
    info: TensorInfo,
    op: EditOp,
    basis: np.ndarray,
    dst: int,
    work: Workspace | None = None,
    preserve_norm: bool = False,
) -> None:
    """Write the projected tensor at its offset in ``dst``.

    Tiles of ``TILE_BYTES`` (math dtype, cache-sized) are decoded, projected and encoded into
    an output block of ``OUT_BYTES``, which is written with one ``pwrite``. Rows of an embedding
    (or a Conv1D ``[in, d_model]``) are independent writers; a row-major ``[d_model, in]``
    weight first needs ``U W`` from every row: a first pass over the tiles. ``basis``:
    ``[k, d_model]`` orthonormal rows (the op's u when k = 1).
    """
    work = work or Workspace()
    math = MATH_DTYPE[info.dtype]
    q = np.atleast_2d(basis).astype(math)  # [k, d_model]
    values = stored(shard.bytes(info), info.dtype)
    if len(info.shape) == 1:
        b = _projected_vector(values.astype(math), q, op.scale, preserve_norm)
        _write_all(dst, encode(b, info.dtype), info.start)
        return
    if len(info.shape) == 3 and op.axis == 1:  # fused experts [experts, d_model, in]
        for expert in expert_slices(info):  # each a [d_model, in] weight
            edit_tensor(shard, expert, op.model_copy(update={"axis": 0}), basis, dst, work,
                        preserve_norm)  # fmt: skip
        return
    rows, cols = info.shape[0], int(np.prod(info.shape[1:]))
    axis = op.axis
    if len(info.shape) == 3:  # fused experts [experts, in, d_model]: rows of d_model
        rows, cols, axis = info.shape[0] * info.shape[1], info.shape[2], 1
    values = values.reshape(rows, cols)
    row_bytes = cols * info.itemsize
    tile = max(1, TILE_BYTES // (cols * np.dtype(math).itemsize))
    out_rows = max(1, OUT_BYTES // row_bytes // tile) * tile

    def load(i0: int, i1: int) -> np.ndarray:
        block = work.get("tile", (i1 - i0, cols), math)
        np.copyto(block, values[i0:i1])
        return block

    coeff = factors = None
    if axis == 0:
        coeff, factors = column_pass(load, rows, cols, tile, q, op.scale, preserve_norm)
    for o0, o1 in row_blocks(rows, out_rows):
        out = work.get("out", (o1 - o0, cols), values.dtype)
        for i0, i1 in row_blocks(o1 - o0, tile):
            block = load(o0 + i0, o0 + i1)
            if axis == 1:
                remove_rows_(block, q, op.scale, preserve_norm)
            else:
                remove_columns_(block, q[:, o0 + i0 : o0 + i1], coeff, op.scale, factors)
            np.copyto(out[i0:i1], block, casting="same_kind")  # rounds to nearest even
        _write_all(dst, out, info.start + o0 * row_bytes)


def _unedited_spans(shard: SafetensorsFile, edited: list[TensorInfo]) -> list[tuple[int, int]]:
    """Byte ranges ``(start, length)`` of the shard that no planned tensor covers."""
    spans, pos = [], 0
    for info in edited:
        spans.append((pos, info.start - pos))
        pos = info.end
    spans.append((pos, shard.size - pos))
    return [(s, n) for s, n in spans if n > 0]


def _in_order(shard: SafetensorsFile, names: set[str]) -> list[TensorInfo]:
    """The shard's tensors among ``names``, in file order."""
    return sorted((t for t in shard.tensors.values() if t.name in names), key=lambda t: t.start)


def _serve(stop: threading.Event, *queues: deque) -> None:
    """Run the jobs of each queue in turn with one workspace, until all are empty or ``stop``
    is set; an error sets ``stop`` for the other thread."""
    work = Workspace()
    try:
        for queue in queues:
            while not stop.is_set():
                try:
                    job = queue.popleft()
                except IndexError:
                    break
                job(work)
    except BaseException:
        stop.set()  # the other thread stops at its next job; the caller removes the output
        raise


def stream_shards(
    jobs: list[tuple[SafetensorsFile, Path]],
    ops: dict[str, EditOp],
    bases: dict[str, np.ndarray],
    progress: OnBytes | None = None,
    preserve_norm: bool = False,
    quant: QuantFormat | None = None,
) -> None:
    """Write each ``(source shard, output path)``: header and unedited bytes copied, planned
    tensors projected in place. Every write lands at its own offset, so order does not matter.

    Two queues, edits (one tensor each) and copies (``COPY_BLOCK`` pieces of the unedited
    ranges), served by two threads: the calling thread takes edits first, a second thread
    takes copies first, and each moves to the other queue when its own is empty, so neither
    core idles while work remains. Each thread keeps one workspace for the whole run.
    """
    edits: deque[Callable[[Workspace], None]] = deque()
    copies: deque[Callable[[Workspace], None]] = deque()
    stop = threading.Event()

    where = {n: (shard, dst) for shard, dst in jobs for n in shard.tensors}
    rewritten = set(ops) | {op.scales for op in ops.values() if op.scales}  # and fresh scales

    def edit_job(shard: SafetensorsFile, info: TensorInfo, dst: Path):
        def job(work: Workspace) -> None:
            op, basis = ops[info.name], bases[info.name]
            if op.scales:  # quantized: requantized with fresh scales
                _edit_quantized(where, op, basis, preserve_norm, quant)
            else:
                _edit_float(shard, info, op, basis, dst, work, preserve_norm)
            if progress:
                progress(info.nbytes)

        return job

    def copy_job(src: Path, dst: Path, offset: int, length: int):
        def job(work: Workspace) -> None:
            sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
            try:
                copy_bytes(sfd, dfd, offset, length, stop)
            finally:
                os.close(sfd)
                os.close(dfd)
            if progress:
                progress(length)

        return job

    for shard, dst in jobs:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        edits.extend(edit_job(shard, info, dst) for info in _in_order(shard, set(ops)))
        for start, length in _unedited_spans(shard, _in_order(shard, rewritten)):
            for offset in range(start, start + length, COPY_BLOCK):
                size = min(COPY_BLOCK, start + length - offset)
                copies.append(copy_job(shard.path, dst, offset, size))

    with ThreadPoolExecutor(1, thread_name_prefix="orthoedit-copy") as pool:
        helper = pool.submit(_serve, stop, copies, edits)
        _serve(stop, edits, copies)  # on error, leaving the pool waits for the helper to stop
        helper.result()  # the helper's error, if it had one


def _edit_float(shard, info, op, basis, dst: Path, work: Workspace, preserve_norm: bool) -> None:
    """``edit_tensor`` into the output shard at ``dst``."""
    fd = os.open(dst, os.O_WRONLY)
    try:
        edit_tensor(shard, info, op, basis, fd, work, preserve_norm)
    finally:
        os.close(fd)


def _edit_quantized(where: dict, op: EditOp, basis: np.ndarray, preserve_norm: bool, fmt) -> None:
    """A quantized weight and its scales (possibly in another shard), edited in place in their
    output shards (``where``: tensor -> (source shard, output path))."""
    (shard, dst), (scale_shard, scale_dst) = where[op.tensor], where[op.scales]
    src = (shard, shard.tensors[op.tensor])
    scales = (scale_shard, scale_shard.tensors[op.scales])
    fd, scale_fd = os.open(dst, os.O_WRONLY), os.open(scale_dst, os.O_WRONLY)
    try:

        def write(offset: int, data, scale_offset: int, scale_data) -> None:
            _write_all(fd, data, offset)
            _write_all(scale_fd, scale_data, scale_offset)

        requantize(fmt, src, scales, op, basis, write, preserve_norm)
    finally:
        os.close(fd)
        os.close(scale_fd)


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
    plan: Plan, checkpoint: Checkpoint, out: Path, progress: OnBytes | None = None
) -> dict[str, str]:
    """Write every shard of ``checkpoint`` into ``out`` with the plan applied.

    Returns the output weight map (tensor -> shard file name).
    """
    ops = {op.tensor: op for op in plan.ops}
    bases = {name: op_basis(op, plan, checkpoint) for name, op in ops.items()}
    rename = {}
    if plan.write_lm_head and checkpoint.index is None:
        # transformers prefers model.safetensors over an index, so a single file must become
        # a sharded checkpoint once it gains a second shard.
        rename = {SINGLE_NAME: "model-00001-of-00002.safetensors"}
    weight_map: dict[str, str] = {}
    jobs = []
    for shard in checkpoint.files:
        name = rename.get(shard.path.name, shard.path.name)
        jobs.append((shard, out / name))
        weight_map.update({t: name for t in shard.tensors})
    preserve = plan.method == "norm-preserving"
    stream_shards(jobs, ops, bases, progress, preserve, checkpoint.quant)
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
