"""Reading safetensors checkpoints without loading them: headers, offsets, byte ranges.

A safetensors file is an 8-byte little-endian header length, a JSON header, then raw tensor
bytes. orthoedit never parses tensors it does not edit: it copies their bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from ..errors import BadInputError, UnsupportedModelError

if TYPE_CHECKING:
    from .quant import QuantFormat

#: Float storage dtypes orthoedit edits, with their size in bytes.
DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
#: Their numpy element types (bfloat16 from ml_dtypes: compiled casts, NaN-safe rounding).
STORAGE: dict[str, type] = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.gguf", "*.ckpt", "*.h5", "*.msgpack")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]


@dataclass
class SafetensorsFile:
    path: Path
    header_bytes: bytes  # the JSON header exactly as stored (copied verbatim on edit)
    data_start: int
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    _map: np.ndarray | None = field(default=None, repr=False)

    def bytes(self, info: TensorInfo) -> np.ndarray:
        """A tensor's bytes as a read-only uint8 view of the memory-mapped file (no copy)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return np.asarray(self._map[info.start : info.end])

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise BadInputError(f"{path}: truncated safetensors file (no header length).")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise BadInputError(
                        f"{path}: truncated or corrupt safetensors header "
                        f"(header claims {n} bytes, file has {size})."
                    )
                header_bytes = f.read(n)
        except OSError as err:
            raise BadInputError(f"{path}: cannot read ({err.strerror}).") from err
        try:
            header = json.loads(header_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadInputError(f"{path}: corrupt safetensors header ({err}).") from err
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        tensors: dict[str, TensorInfo] = {}
        for name, meta in header.items():
            start, end = meta["data_offsets"]
            info = TensorInfo(
                name,
                path,
                meta["dtype"],
                tuple(meta["shape"]),
                data_start + start,
                data_start + end,
            )
            if info.end > size:
                raise BadInputError(
                    f"{path}: truncated safetensors file (tensor {name} ends at byte {info.end}, "
                    f"file has {size})."
                )
            tensors[name] = info
        return cls(path, header_bytes, data_start, size, tensors, metadata)


@dataclass
class Checkpoint:
    """A folder of safetensors weights (single file or sharded with an index)."""

    folder: Path
    files: list[SafetensorsFile]
    tensors: dict[str, TensorInfo]
    index: dict | None  # parsed model.safetensors.index.json, or None for a single file
    quant: QuantFormat | None = None  # the format of quantized weights (model.quant)

    @classmethod
    def open(cls, folder: Path, quant: QuantFormat | None = None) -> Checkpoint:
        folder = Path(folder)
        index_path = folder / INDEX_NAME
        index = None
        if index_path.exists():
            try:
                index = json.loads(index_path.read_text())
                weight_map: dict[str, str] = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise BadInputError(f"{index_path}: corrupt index ({err}).") from err
            names = sorted(set(weight_map.values()))
            for name in names:
                if not (folder / name).is_file():
                    raise BadInputError(
                        f"{folder}: shard {name} named by {INDEX_NAME} is missing; "
                        "download the complete checkpoint."
                    )
            files = [SafetensorsFile.open(folder / name) for name in names]
        elif (folder / SINGLE_NAME).is_file():
            files = [SafetensorsFile.open(folder / SINGLE_NAME)]
        else:
            raise _no_safetensors(folder)
        tensors = {n: t for f in files for n, t in f.tensors.items()}
        if index is not None:
            for name, shard in index["weight_map"].items():
                info = tensors.get(name)
                if info is None or info.file.name != shard:
                    raise BadInputError(
                        f"{index_path}: tensor {name} is listed in {shard} but that shard does "
                        "not contain it; the checkpoint is incomplete or corrupt."
                    )
        return cls(folder, files, tensors, index, quant)

    def stored(self, name: str, axis: int) -> tuple[str, str | None, int]:
        """A planned weight as stored: (name, its scale tensor or None for a float weight,
        residual axis once dequantized); see ``quant.stored_weight``."""
        from .quant import stored_weight

        return stored_weight(self, name, axis, self.quant)

    def shard(self, info: TensorInfo) -> SafetensorsFile:
        return next(f for f in self.files if f.path == info.file)

    def read(self, name: str) -> np.ndarray:
        """One tensor decoded to float64 (meant for norm weights and checks, not for streaming)."""
        info = self.tensors[name]
        return decode(self.shard(info).bytes(info), info.dtype, np.float64).reshape(info.shape)

    def along(self, name: str, u: np.ndarray, axis: int, block_bytes: int = 64 << 20):
        """(components along u on ``axis``, Frobenius norm), in float64, one row block at a time.

        Memory stays one block even for a 128k-vocabulary embedding, which would be GBs in
        float64 if read whole.
        """
        along, sq = self.along_and_lengths(name, u, axis, block_bytes)
        return along, float(sq.sum()) ** 0.5

    def along_and_lengths(
        self, name: str, basis: np.ndarray, axis: int, block_bytes: int = 64 << 20
    ):
        """Per vector along ``axis`` (a column of ``[d, in]``, a row of an embedding): its
        components in the orthonormal ``basis`` ``[k, d]`` (``[k, vectors]``; a unit vector
        ``[d]`` gives ``[vectors]``) and its squared length, in float64, one row block at a
        time. A fused ``[experts, d, in]`` tensor's vectors are its experts' columns, the
        experts one after the other."""
        info = self.tensors[name]
        if len(info.shape) == 3 and axis == 1:
            parts = [self._along(e, basis, 0, block_bytes) for e in expert_slices(info)]
            return concat_experts(parts)
        return self._along(info, basis, axis, block_bytes)

    def _along(self, info: TensorInfo, basis: np.ndarray, axis: int, block_bytes: int):
        raw = self.shard(info).bytes(info)
        if len(info.shape) == 1:
            return along_vector(decode(raw, info.dtype, np.float64), basis)
        rows, cols = info.shape[0], info.shape[-1]
        if len(info.shape) == 3:  # fused experts [experts, in, d_model]: rows of d_model
            rows, axis = info.shape[0] * info.shape[1], 1
        matrix = raw.reshape(rows, cols * info.itemsize)
        step = max(1, block_bytes // (cols * 8))
        blocks = (
            decode(matrix[i0 : i0 + step], info.dtype, np.float64).reshape(-1, cols)
            for i0 in range(0, rows, step)
        )
        return along_blocks(blocks, basis, axis)


def along_vector(b: np.ndarray, basis: np.ndarray):
    """(components in ``basis``, squared length) of one float64 vector (a bias)."""
    q = np.asarray(basis, dtype=np.float64)
    found = [np.asarray(u @ b) for u in np.atleast_2d(q)]
    return (found[0] if q.ndim == 1 else np.stack(found)), np.asarray(b @ b)


def along_blocks(blocks, basis: np.ndarray, axis: int):
    """(components in the orthonormal ``basis`` ``[k, d]`` (``[d]``: one vector), squared
    lengths) of the vectors of a float64 matrix read as consecutive row blocks: its rows
    (``axis`` 1) or its columns (``axis`` 0), as ``Checkpoint.along_and_lengths`` gives them."""
    q = np.asarray(basis, dtype=np.float64)
    rows_of = np.atleast_2d(q)  # one matrix-vector product per basis vector (see ortho)

    def fold(parts: list[np.ndarray]) -> np.ndarray:
        return parts[0] if q.ndim == 1 else np.stack(parts)

    parts, sq_rows, first = [], [], 0
    coeff = sq_cols = 0.0
    for block in blocks:
        if axis == 1:
            parts.append(fold([block @ u for u in rows_of]))
            sq_rows.append(np.einsum("ij,ij->i", block, block))
        else:
            n = block.shape[0]
            coeff = coeff + fold([u[first : first + n] @ block for u in rows_of])
            sq_cols = sq_cols + np.einsum("ij,ij->j", block, block)
            first += n
    if axis == 1:
        return np.concatenate(parts, axis=-1), np.concatenate(sq_rows)
    return coeff, sq_cols


def concat_experts(parts: list[tuple[np.ndarray, np.ndarray]]):
    """Per-expert (components, squared lengths) joined along the vectors' axis."""
    return np.concatenate([a for a, _ in parts], axis=-1), np.concatenate([b for _, b in parts])


def expert_slices(info: TensorInfo) -> list[TensorInfo]:
    """The experts of a fused ``[experts, a, b]`` tensor, each as a 2-D ``[a, b]`` tensor at
    its own byte range."""
    n, shape = info.shape[0], info.shape[1:]
    step = info.nbytes // n
    return [
        TensorInfo(f"{info.name}[{e}]", info.file, info.dtype, shape, info.start + e * step,
                   info.start + (e + 1) * step)
        for e in range(n)
    ]  # fmt: skip


def same_bytes(a: Path, a_start: int, b: Path, b_start: int, n: int, block: int = 64 << 20) -> bool:
    """Whether ``n`` bytes of file ``a`` at ``a_start`` equal those of ``b`` at ``b_start``."""
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        for off in range(0, n, block):
            k = min(block, n - off)
            if os.pread(fa.fileno(), k, a_start + off) != os.pread(fb.fileno(), k, b_start + off):
                return False
    return True


def stored(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bytes (uint8, last axis) viewed as their element dtype (no copy)."""
    return raw.view(STORAGE[dtype])


def decode(raw: np.ndarray, dtype: str, math: type[np.floating]) -> np.ndarray:
    """Stored bytes (uint8) -> a new float array in ``math`` precision (exact upcast)."""
    return stored(raw, dtype).astype(math)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float array -> stored dtype, rounding once to nearest even (as torch does)."""
    return values.astype(STORAGE[dtype])


def _no_safetensors(folder: Path) -> BadInputError:
    others = sorted(p.name for pat in OTHER_WEIGHT_PATTERNS for p in folder.glob(pat))
    if others:
        return UnsupportedModelError(
            f"{folder} holds only {', '.join(others[:3])} weights; orthoedit edits safetensors. "
            "Convert first: AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)"
            " writes safetensors."
        )
    return BadInputError(f"{folder} contains no model.safetensors or {INDEX_NAME}.")


def save_stable(tensors: dict[str, np.ndarray], path: str | Path, metadata: dict[str, str]) -> None:
    """``safetensors.numpy.save_file``, with the header's keys in sorted order: safetensors
    writes metadata in hash-map order, which changes from one process to the next, and an
    artifact that is hashed must not."""
    from safetensors.numpy import save

    blob = save(tensors, metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    ordered = json.dumps(
        dict(sorted(header.items())), separators=(",", ":"), ensure_ascii=False
    ).encode()
    ordered = ordered.ljust(n)  # same length (same content); spaces are valid padding
    if len(ordered) != n:
        raise RuntimeError("safetensors header changed length when sorted")
    Path(path).write_bytes(blob[:8] + ordered + blob[8 + n :])
