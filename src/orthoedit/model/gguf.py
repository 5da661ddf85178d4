"""GGUF models: a ``.gguf`` file (local, or ``OWNER/REPO/FILE.gguf`` on the Hub), its config as
transformers reads it, and its tensors under the names orthoedit's tables use.

A GGUF stores every matrix the way ggml multiplies it: ``ne = [in, out]``, read by numpy as
``[out, in]``; embeddings are ``[vocab, d_model]`` rows, fused experts ``[experts, out, in]``.
``GgufCheckpoint`` presents the tensors under the transformers names the gguf package maps
to each GGUF name (several per tensor: the variants of the families sharing an architecture),
so that ``build_plan`` plans a GGUF exactly as a safetensors checkpoint. Norm weights are read
as transformers loads them (llama.cpp's converter adds 1 to Gemma's, transformers subtracts it).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError, UnsupportedModelError
from .checkpoint import TensorInfo, along_blocks, along_vector, concat_experts

SUFFIX = ".gguf"
_SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
#: Converter steps transformers undoes on load, by GGUF architecture (its TensorProcessors):
#: norm weights stored as 1 + w.
_NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3", "gemma3n", "nemotron")


def is_gguf(model: str | Path | None) -> bool:
    """Whether a model spec names a GGUF file (by its suffix)."""
    return model is not None and str(model).lower().endswith(SUFFIX)


def resolve_gguf(model: str, revision: str | None = None) -> Path:
    """The local path of a GGUF named by a path or by ``OWNER/REPO/FILE.gguf`` on the Hub."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_file():
            raise BadInputError(f"{model} is not a file.")
        if revision is not None:
            raise BadInputError("--revision applies to Hub ids, not to local files.")
        return path.resolve()
    parts = model.split("/")
    if len(parts) < 3 or model.startswith((".", "/", "~")) or "" in parts:
        raise BadInputError(
            f"{model}: no such file; a GGUF on the Hub is named OWNER/REPO/FILE.gguf."
        )
    from huggingface_hub import hf_hub_download

    from .hub import from_hub

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    found = from_hub(
        repo, revision, hf_hub_download, filename, what=f"downloading {filename}",
        missing=f"{repo} has no file {filename}.", local=f"a local copy of {filename}",
    )  # fmt: skip
    return Path(found)


#: GGUF value types (gguf.GGUFValueType) with fixed sizes, as struct formats.
_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
#: Architectures whose GGUF name is not transformers' model_type (as transformers renames them).
_MODEL_TYPE = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (ggml's ne reversed)
    start: int  # absolute byte offset
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type).name


@dataclass
class GgufLayout:
    """A GGUF file's structure, read without its tensor data or big arrays: the raw bytes of
    the metadata (copied verbatim by an edit), scalar and string values, tensor infos."""

    path: Path
    version: int
    kv_bytes: bytes  # every key-value pair exactly as stored
    kv_count: int
    values: dict  # key -> value for scalars, strings and arrays of up to 1024 numbers
    tensors: list[GgufTensor]
    alignment: int
    size: int

    def get(self, key: str, default=None):
        return self.values.get(key, default)


class _Cursor:
    def __init__(self, data: np.ndarray, pos: int) -> None:
        self.data, self.pos = data, pos

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > self.data.size:
            raise ValueError("unexpected end of file")
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > self.data.size:
            raise ValueError("unexpected end of file")
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8")

    def skip_strings(self, count: int) -> None:
        data, pos = self.data, self.pos
        for _ in range(count):
            pos += 8 + int(struct.unpack_from("<Q", data, pos)[0])
        if pos > data.size:
            raise ValueError("unexpected end of file")
        self.pos = pos

    def value(self, kind: int):
        if kind in _SCALAR:
            return self.unpack(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown value type {kind}")
        inner, count = self.unpack("I"), self.unpack("Q")
        if inner == _STRING:
            self.skip_strings(count)
            return None
        if inner not in _SCALAR:
            raise ValueError(f"unknown array type {inner}")
        size = struct.calcsize(_SCALAR[inner])
        values = None
        if count <= 1024:
            values = list(struct.unpack_from(f"<{count}{_SCALAR[inner]}", self.data, self.pos))
        self.pos += size * count
        return values


def read_layout(path: Path) -> GgufLayout:
    """Parse the header, metadata and tensor infos of a GGUF; bad input for anything that is
    not a whole little-endian GGUF (v2 or v3)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        data = np.memmap(path, mode="r")
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path}: cannot read ({err}).") from err
    cur = _Cursor(data, 0)
    try:
        if bytes(data[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("I"), cur.unpack("Q"), cur.unpack("Q")
        if version not in (2, 3):
            raise ValueError(f"version {version} (big-endian, or not v2/v3)")
        kv_start, values = cur.pos, {}
        for _ in range(n_kv):
            key = cur.string()
            values[key] = cur.value(cur.unpack("I"))
        kv_bytes = bytes(data[kv_start : cur.pos])
        infos = []
        for _ in range(n_tensors):
            name, ndim = cur.string(), cur.unpack("I")
            ne = [cur.unpack("Q") for _ in range(ndim)]
            infos.append((name, ne, cur.unpack("I"), cur.unpack("Q")))
    except (ValueError, struct.error, UnicodeDecodeError) as err:
        raise BadInputError(
            f"{path}: not a readable GGUF file ({err}); it may be truncated or corrupt."
        ) from err
    alignment = int(values.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, ne, kind, offset in infos:
        if kind not in GGML_QUANT_SIZES:
            raise BadInputError(f"{path}: tensor {name} has unknown type {kind}.")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        nbytes = int(np.prod(ne, dtype=np.int64)) // block * size
        tensors.append(GgufTensor(name, kind, tuple(reversed(ne)), data_start + offset, nbytes))
    layout = GgufLayout(path, version, kv_bytes, n_kv, values, tensors, alignment, data.size)
    _check_whole(layout)
    return layout


def _check_whole(layout: GgufLayout) -> None:
    path = layout.path
    if not layout.tensors or max(t.start + t.nbytes for t in layout.tensors) > layout.size:
        raise BadInputError(f"{path}: the GGUF is truncated (its tensors end past the file).")
    count = int(layout.get("split.count", 1) or 1)
    if count > 1:
        number = int(layout.get("split.no", 0)) + 1
        first = _SPLIT_NAME.sub(f"-00001-of-{count:05d}.gguf", path.name)
        if number != 1:
            raise BadInputError(
                f"{path} is part {number} of {count} of a split GGUF; give its first part"
                f" ({first})."
            )
        raise UnsupportedModelError(
            f"{path} is the first of {count} parts of a split GGUF; merge them first "
            f"(llama-gguf-split --merge {path.name} merged.gguf)."
        )


def layout_config(layout: GgufLayout) -> dict:
    """The config fields orthoedit's tables read, from the GGUF metadata through transformers'
    own key mapping (``GGUF_CONFIG_MAPPING``). (transformers builds its own, fuller config when
    it loads the model: this one plans the edit and chooses the table, exactly as apply does.)"""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = str(layout.get("general.architecture", ""))
    model_type = _MODEL_TYPE.get(arch, arch)
    mapping = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING.get(arch)
    if mapping is None:
        raise UnsupportedModelError(
            f"{layout.path}: transformers reads no GGUF of architecture {arch!r}; orthoedit "
            "edits the GGUF architectures transformers reads."
        )
    config = {"model_type": model_type}
    for key, value in layout.values.items():
        if key.startswith(arch + ".") and mapping.get(key[len(arch) + 1 :]):
            config[mapping[key[len(arch) + 1 :]]] = value
    names = {t.name for t in layout.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    return config


def gguf_table(config: dict, path: Path):
    """The shipped table of a GGUF's architecture. GGUFs are never given a derived table:
    derivation builds the transformers class from config.json, which a GGUF does not have."""
    from .architectures import table_for_config

    try:
        return table_for_config(config)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(
            f"{path}: GGUF of architecture {config['model_type']!r}, which orthoedit has no "
            "table for (GGUFs are edited with shipped tables only): see orthoedit architectures."
        ) from err


def gguf_config(path: Path) -> dict:
    """A GGUF's config (``layout_config``) once the file is known to be whole and its
    architecture to have a shipped table (``gguf_table``): what ``read_config`` gives for a
    GGUF, so that every stage refuses the same files in the same words."""
    config = layout_config(read_layout(path))
    gguf_table(config, path)
    return config


def open_gguf(path: Path) -> GgufCheckpoint:
    """The tensors of the GGUF at ``path`` under transformers names (``GgufCheckpoint``)."""
    layout = read_layout(path)
    return GgufCheckpoint.open(layout, int(layout_config(layout).get("num_hidden_layers", 0)))


def tensor_values(layout: GgufLayout, tensor: GgufTensor, rows: slice | None = None):
    """A tensor's stored values (rows of its flattened ``[rows, row]`` view): a float array
    for F32/F16, else raw bytes ``[rows, bytes per row]`` for ``gguf.dequantize``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType(tensor.type)
    block, size = GGML_QUANT_SIZES[kind]
    row = tensor.shape[-1] // block * size
    raw = np.memmap(layout.path, mode="r", offset=tensor.start, shape=(tensor.nbytes,))
    raw = raw.reshape(-1, row)
    return raw if rows is None else raw[rows]


def dequantized(layout: GgufLayout, tensor: GgufTensor, rows: slice | None = None):
    """Rows of a tensor (its flattened ``[rows, row]`` view) as float32."""
    from gguf import GGMLQuantizationType, dequantize

    raw = tensor_values(layout, tensor, rows)
    return np.asarray(dequantize(raw, GGMLQuantizationType(tensor.type)), dtype=np.float32)


@dataclass
class GgufCheckpoint:
    """A GGUF's tensors under transformers names (see the module docstring); the plan reads
    shapes and norm weights from it as from a safetensors ``Checkpoint``."""

    layout: GgufLayout
    arch: str
    tensors: dict[str, TensorInfo]  # transformers name -> info (shape as transformers has it)
    source: dict[str, tuple[GgufTensor, int | None]]  # name -> (GGUF tensor, expert or None)
    quant: None = None
    editable: frozenset[str] = field(default_factory=frozenset)  # every GGML type it decodes

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def folder(self) -> Path:
        return self.layout.path.parent

    @classmethod
    def open(cls, layout: GgufLayout, n_layers: int) -> GgufCheckpoint:
        from gguf import GGMLQuantizationType, get_tensor_name_map
        from gguf.constants import MODEL_ARCH_NAMES

        arch = str(layout.get("general.architecture", ""))
        key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if key is None:
            raise UnsupportedModelError(
                f"{layout.path}: GGUF architecture {arch!r} is unknown to gguf."
            )
        by_gguf = {t.name: t for t in layout.tensors}
        tensors, source = {}, {}
        for hf, (_, gguf_base) in get_tensor_name_map(key, n_layers).mapping.items():
            for suffix in (".weight", ".bias"):
                tensor = by_gguf.get(gguf_base + suffix)
                if tensor is None:
                    continue
                for name, expert, shape in _views(hf + suffix, tensor):
                    tensors[name] = _info(name, layout.path, tensor, shape)
                    source[name] = (tensor, expert)
        editable = frozenset(t.name for t in GGMLQuantizationType)
        return cls(layout, arch, tensors, source, editable=editable)

    def stored(self, name: str, axis: int) -> tuple[str, None, int]:
        return name, None, axis

    def read(self, name: str) -> np.ndarray:
        """One tensor dequantized to float64, as transformers loads it (meant for norms)."""
        tensor, expert = self.source[name]
        values = dequantized(self.layout, tensor).astype(np.float64).reshape(tensor.shape)
        if expert is not None:
            values = values[expert]
        if self.arch in _NORM_PLUS_ONE and "norm" in tensor.name and values.ndim == 1:
            values = values - 1.0
        return values.reshape(self.tensors[name].shape)

    def along_and_lengths(
        self, name: str, basis: np.ndarray, axis: int, block_bytes: int = 64 << 20
    ):
        """As ``Checkpoint.along_and_lengths``, of the dequantized tensor, a block of rows at a
        time (verify's check of an edited tensor)."""
        tensor, expert = self.source[name]
        shape = self.tensors[name].shape
        if len(shape) == 1:
            return along_vector(self._rows(tensor, 0, 1).reshape(-1), basis)
        if len(shape) == 3 and axis == 1:  # fused [experts, out, in]: each expert's columns
            n = shape[0]
            return concat_experts([self._along(tensor, e, shape[1:], basis, 0, block_bytes)
                                   for e in range(n)])  # fmt: skip
        if len(shape) != 2:
            raise UnsupportedModelError(f"{name}: no check of a {shape} tensor along axis {axis}.")
        return self._along(tensor, expert or 0, shape, basis, axis, block_bytes)

    def _along(self, tensor: GgufTensor, expert: int, shape, basis, axis: int, block_bytes: int):
        """Of the matrix ``shape`` (expert ``expert`` of a fused tensor, else the tensor): the
        components and squared lengths of its rows (``axis`` 1) or its columns (``axis`` 0)."""
        n, cols = shape
        step, first = max(1, block_bytes // (cols * 8)), expert * n
        rows = range(first, first + n, step)
        blocks = (self._rows(tensor, i, min(i + step, first + n)) for i in rows)
        return along_blocks(blocks, basis, axis)

    def _rows(self, tensor: GgufTensor, i0: int, i1: int) -> np.ndarray:
        """Rows ``i0:i1`` of the tensor's flattened ``[rows, row]`` view, in float64."""
        values = dequantized(self.layout, tensor, slice(i0, i1)).astype(np.float64)
        return values.reshape(i1 - i0, tensor.shape[-1])


def _views(name: str, tensor: GgufTensor) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """The names a GGUF tensor is seen under: itself, and for a fused-experts tensor
    ``[experts, out, in]`` each expert's ``experts.{e}.`` slice as well."""
    views = [(name, None, tensor.shape)]
    if len(tensor.shape) == 3 and ".experts." in name:
        head, tail = name.split(".experts.", 1)
        views += [
            (f"{head}.experts.{e}.{tail}", e, tensor.shape[1:]) for e in range(tensor.shape[0])
        ]
    return views


def _info(name: str, path: Path, tensor: GgufTensor, shape: tuple[int, ...]) -> TensorInfo:
    end = tensor.start + tensor.nbytes
    return TensorInfo(name, path, tensor.type_name, shape, tensor.start, end)
