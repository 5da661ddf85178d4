"""Requantizing edited GGUF tensors in their own type.

The gguf package quantizes F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and MXFP4 (numpy). K- and
i-quants are quantized by llama.cpp's own quantizer (``ggml_quantize_chunk`` of the ggml
library that llama-cpp-python builds) where it is installed; otherwise, and for the types ggml
quantizes only with an importance matrix, the tensor is written as Q8_0 and the plan says so.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

#: Types the gguf package quantizes (tests/test_gguf.py checks that it does).
NUMPY_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4"})
FALLBACK = "Q8_0"
FLOAT_KINDS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Ggml:
    """llama.cpp's quantizer, through ctypes on the ggml library llama-cpp-python ships."""

    lib: ctypes.CDLL
    path: Path

    def can(self, kind: str) -> bool:
        from gguf import GGMLQuantizationType

        value = GGMLQuantizationType[kind].value
        return not self.lib.ggml_quantize_requires_imatrix(value)

    def quantize(self, values: np.ndarray, kind: str) -> np.ndarray:
        """``[rows, n]`` float32 -> ``[rows, bytes per row]`` uint8."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType[kind]
        block, size = GGML_QUANT_SIZES[qtype]
        src = np.ascontiguousarray(values, dtype=np.float32)
        rows, n = src.shape
        out = np.empty((rows, n // block * size), dtype=np.uint8)
        self.lib.ggml_quantize_init(qtype.value)
        written = self.lib.ggml_quantize_chunk(
            qtype.value, src.ctypes.data, out.ctypes.data, 0, rows, n, None
        )
        if written != out.nbytes:
            raise RuntimeError(f"ggml wrote {written} bytes of {kind}, expected {out.nbytes}")
        return out


@cache
def ggml() -> Ggml | None:
    """llama.cpp's ggml library from an installed llama-cpp-python, or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            path = Path(folder) / "lib" / name
            if path.is_file():
                return Ggml(_bind(ctypes.CDLL(str(path))), path)
    return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    return lib


def target(kind: str, row: int) -> tuple[str, str]:
    """The type an edited tensor of type ``kind`` (rows of ``row`` elements) is written in,
    and by what: ("gguf" | "llama.cpp" | a reason it falls back to Q8_0)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if kind in NUMPY_TYPES:
        return kind, "gguf"
    found = ggml()
    if found is None:
        return FALLBACK, "llama.cpp's quantizer (llama-cpp-python) is not installed"
    if not found.can(kind):
        return FALLBACK, f"llama.cpp quantizes {kind} only with an importance matrix"
    if row % GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0]:
        return FALLBACK, f"rows of {row} do not fill {kind} blocks"
    return kind, "llama.cpp"


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """``[rows, n]`` floats in ``kind``: a float array for F32/F16, else uint8 bytes."""
    from gguf import GGMLQuantizationType
    from gguf import quantize as gguf_quantize

    if kind in NUMPY_TYPES:
        return gguf_quantize(np.asarray(values, dtype=np.float32), GGMLQuantizationType[kind])
    found = ggml()
    assert found is not None, kind
    return found.quantize(values, kind)


def row_bytes(kind: str, n: int) -> int:
    """Bytes of one row of ``n`` elements in ``kind``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return n // block * size


#: Significand bits (with the hidden bit) of the float GGML types.
_FLOAT_BITS = {"F32": 24, "F16": 11, "BF16": 8, "F64": 53}


def epsilon(kind: str) -> float:
    """ε of a GGML type: 2^-b, b its significand bits (floats) or whole bits per weight."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if kind in _FLOAT_BITS:
        return 2.0 ** -_FLOAT_BITS[kind]
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return 2.0 ** -max(1, math.floor(size * 8 / block))
