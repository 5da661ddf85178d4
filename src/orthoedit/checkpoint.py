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

import torch

from .errors import BadInputError, UnsupportedModelError

DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
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
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class SafetensorsFile:
    path: Path
    header_bytes: bytes  # the JSON header exactly as stored (copied verbatim on edit)
    data_start: int
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

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

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
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
        return cls(folder, files, tensors, index)

    def read(self, name: str) -> torch.Tensor:
        """One tensor, fully read (meant for small tensors such as norm weights)."""
        info = self.tensors[name]
        return read_range(info, 0, info.nbytes).reshape(info.shape)


def read_range(info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor:
    """Bytes ``[offset, offset + nbytes)`` of a tensor as a flat tensor of its dtype."""
    buf = bytearray(nbytes)
    with open(info.file, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [buf], info.start + offset)
    if got != nbytes:
        raise BadInputError(f"{info.file}: short read in tensor {info.name}; file truncated?")
    return torch.frombuffer(buf, dtype=info.torch_dtype)


def _no_safetensors(folder: Path) -> BadInputError:
    others = sorted(p.name for pat in OTHER_WEIGHT_PATTERNS for p in folder.glob(pat))
    if others:
        return UnsupportedModelError(
            f"{folder} holds only {', '.join(others[:3])} weights; orthoedit edits safetensors. "
            "Convert first: AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)"
            " writes safetensors."
        )
    return BadInputError(f"{folder} contains no model.safetensors or {INDEX_NAME}.")
