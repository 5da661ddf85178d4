"""Quantized checkpoints that stay quantized (docs/design.md, "Quantized checkpoints").

Formats are data: each is a block of weight elements sharing one scale, an element codec
(numpy, no torch), and a unit roundoff ε (the largest relative rounding error of a value in the
format's normal range). A planned quantized tensor is dequantized, projected and requantized in
its own format (a block keeps its scale while its edited values fit it, else a fresh one),
whole scale blocks at a time; the scale tensor keeps its shape and dtype, so the shard header
does not change.

- ``fp8``: transformers' FineGrainedFP8 (DeepSeek V3, Qwen3-FP8): a weight ``[rows, cols]`` of
  F8_E4M3 values q and a sibling ``<weight>_scale_inv`` ``[⌈rows/bo⌉, ⌈cols/bi⌉]``; the block's
  weights are ``q · scale_inv``. Requantized as ``Fp8Quantize`` does: ``scale_inv = amax/448``,
  ``q = round(w / scale_inv)`` (transformers/integrations/finegrained_fp8.py).
- ``mxfp4``: gpt-oss experts: ``<name>_blocks`` ``[..., rows, cols/32, 16]`` uint8, two E2M1
  values per byte (low nibble first), and ``<name>_scales`` ``[..., rows, cols/32]`` uint8 E8M0
  exponents (bias 127) per 32 elements (transformers/integrations/mxfp4.py). Requantized as
  triton_kernels' ``downcast_to_mxfp_torch`` does by default (transformers' ``Mxfp4Quantize``
  calls it): the scale is amax/6 rounded up to a power of two (no clipping), each element
  rounded to the nearest E2M1 value, ties away from zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import UnsupportedModelError

#: Largest finite float8_e4m3fn value (no infinities in this format).
FP8_MAX = 448.0
#: The 16 E2M1 values, indexed by nibble (sign bit 3): transformers' ``FP4_VALUES``.
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], "f4")
#: Largest E2M1 magnitude, and the midpoints between consecutive magnitudes (for rounding).
FP4_MAX = 6.0
FP4_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], "f4")
#: E8M0 exponent bias: a scale byte b means 2**(b - 127); triton_kernels gives a block of zeros
#: byte 0 and any other block an exponent of at least -126.
E8M0_BIAS = 127
E8M0_MIN = -126
#: MXFP4 elements per scale.
MX_BLOCK = 32
#: Scale dtypes accepted for FP8 ``_scale_inv`` tensors, as numpy types (ue8m0 scales are not).
FP8_SCALES: dict[str, type] = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
#: Largest element, in units of the block scale, that keeps a block's stored scale when it is
#: requantized after an edit (``encode``): the format's largest value plus half its top step
#: (E2M1: 6 + 1; E4M3: 448 + 16), so that the clipped element is off by no more than a
#: rounding error of the top binade.
KEEP_LIMIT = {"mxfp4": 7.0, "fp8": 464.0}
#: Shifted grids' block scales, in units of the stored ones (``regrid``): evenly spaced in
#: log between 1 (the stored grid) and 2 (the stored grid one binade up, which holds every
#: normal FP8 value again), both excluded.
REGRID_FACTORS = (2.0**0.25, 2.0**0.5, 2.0**0.75)
#: What to tell users of any other quantization.
DEQUANTIZE_FIRST = (
    "orthoedit edits float checkpoints and FP8 block-scaled or MXFP4 ones. Use the unquantized "
    "model (or dequantize it first), edit it, then quantize the result."
)


@dataclass(frozen=True)
class QuantFormat:
    """A quantized storage format: which tensors it covers and how precise it is."""

    method: str  # quant_method in config.json
    block: tuple[int, int]  # (rows, cols) of weight elements sharing one scale
    epsilon: float  # unit roundoff: max relative rounding error of a normal value
    normal_min: float  # smallest normal element magnitude, in units of the block scale
    dtype: str  # the weight's safetensors dtype on disk

    def scale_name(self, name: str) -> str:
        """The scale tensor stored beside a quantized weight."""
        if self.method == "mxfp4":
            return name.removesuffix("_blocks") + "_scales"
        return name + "_scale_inv"

    def rounding_bound(self, values: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Per element, the largest rounding error the format can make at that value and
        block scale: ε·|w| in the normal range, ε·normal_min·scale below it (subnormals)."""
        return self.epsilon * np.maximum(np.abs(values), self.normal_min * scales)


def quant_config(config: dict) -> dict | None:
    """config.json's quantization_config (top level or a multimodal text_config), or None."""
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    return quant or None


def quant_format(config: dict, where: object = "the checkpoint") -> QuantFormat | None:
    """The format of a quantized checkpoint orthoedit edits in place; None for a float one.
    Any other quantization is refused in one line that names it."""
    quant = quant_config(config)
    if quant is None:
        return None
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    if method == "mxfp4":
        return QuantFormat("mxfp4", (1, MX_BLOCK), 2.0**-2, 1.0, "U8")
    if method == "fp8" and quant.get("weight_block_size") and quant.get("fmt", "e4m3") == "e4m3":
        if quant.get("scale_fmt", "float") == "float":
            bo, bi = (int(n) for n in quant["weight_block_size"])
            return QuantFormat("fp8", (bo, bi), 2.0**-4, 2.0**-6, "F8_E4M3")
        method = f"fp8 with {quant['scale_fmt']} scales"
    elif method == "fp8":
        method = "fp8 per-tensor" if not quant.get("weight_block_size") else "fp8 e5m2"
    raise UnsupportedModelError(f"{where} is a quantized checkpoint ({method}); {DEQUANTIZE_FIRST}")


def _scale_shape(fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale tensor's expected shape for a weight of ``shape``."""
    if fmt.method == "mxfp4":
        return shape[:-1]
    bo, bi = fmt.block
    return (*shape[:-2], -(-shape[-2] // bo), -(-shape[-1] // bi))


def check_scales(checkpoint, name: str, fmt: QuantFormat) -> str:
    """The scale tensor's name, after checking that it exists and matches the weight."""
    info = checkpoint.tensors[name]
    scale = fmt.scale_name(name)
    other = checkpoint.tensors.get(scale)
    problem = None
    if other is None:
        problem = f"its scale tensor {scale} is missing"
    elif other.shape != _scale_shape(fmt, info.shape):
        problem = (
            f"its scale tensor {scale} has shape {list(other.shape)}, expected "
            f"{list(_scale_shape(fmt, info.shape))} for block size {list(fmt.block)}"
        )
    elif other.dtype not in (("U8",) if fmt.method == "mxfp4" else FP8_SCALES):
        problem = f"its scale tensor {scale} is stored as {other.dtype}"
    if problem:
        raise UnsupportedModelError(
            f"tensor {name} is {fmt.method}-quantized but {problem}; the checkpoint is "
            "inconsistent (re-download or re-quantize it)."
        )
    return scale


def logical_shape(fmt: QuantFormat, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized tensor's shape (MXFP4 packs 32 elements in 16 bytes per block)."""
    if fmt.method == "mxfp4":
        return (*shape[:-2], shape[-2] * shape[-1] * 2)
    return shape


def decode(fmt: QuantFormat, q: np.ndarray, s: np.ndarray, cols: int, scale_dtype: str):
    """Stored rows -> (float32 ``[rows, cols]`` weights, float32 per-element scales).

    q: uint8 ``[rows, row bytes]``; s: uint8 ``[scale rows, scale row bytes]`` covering
    exactly those rows (``rows`` a multiple of the block's rows but for the last block)."""
    rows = q.shape[0]
    if fmt.method == "mxfp4":
        values = np.empty((rows, cols), dtype=np.float32)
        values[:, 0::2] = FP4_VALUES[q & 0x0F]
        values[:, 1::2] = FP4_VALUES[q >> 4]
        scales = np.ldexp(np.float32(1), s.astype(np.int32) - E8M0_BIAS).astype(np.float32)
        scales = np.repeat(scales, MX_BLOCK, axis=1)
    else:
        values = q.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        scales = s.view(FP8_SCALES[scale_dtype]).astype(np.float32)
        bo, bi = fmt.block
        scales = np.repeat(np.repeat(scales, bo, axis=0)[:rows], bi, axis=1)[:, :cols]
    values *= scales
    return values, scales


def encode(
    fmt: QuantFormat, w: np.ndarray, scale_dtype: str, stored: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """float ``[rows, cols]`` weights -> (uint8 element rows, uint8 scale rows) with fresh
    scales per block; the inverse of ``decode`` up to the format's rounding.

    ``stored``: the scale rows' bytes the weights had before an edit. A block keeps its stored
    scale while its largest element still rounds onto that grid (within half the grid's top
    step above its largest value, ``KEEP_LIMIT``): its elements then round back to their old
    values unless the edit moved them past a rounding boundary, where a fresh scale (one binade
    up as soon as one element grew, for MXFP4) would re-round the whole block."""
    if fmt.method == "mxfp4":
        return _encode_mxfp4(w, stored)
    bo, bi = fmt.block
    rows, cols = w.shape
    mag = np.abs(w, dtype=np.float32)
    amax = np.maximum.reduceat(mag, np.arange(0, cols, bi), axis=1)
    amax = np.maximum.reduceat(amax, np.arange(0, rows, bo), axis=0)
    # a block of zeros keeps scale 1 (as transformers does); stored scales are rounded once
    inv = np.where(amax > 0, amax / np.float32(FP8_MAX), 1).astype(FP8_SCALES[scale_dtype])
    if stored is not None:
        old = stored.view(FP8_SCALES[scale_dtype]).reshape(inv.shape)
        limit = np.float32(KEEP_LIMIT["fp8"]) * old.astype(np.float32)
        inv = np.where((old > 0) & (amax <= limit), old, inv)
    per = np.repeat(np.repeat(inv.astype(np.float32), bo, axis=0)[:rows], bi, axis=1)[:, :cols]
    q = np.clip(w / per, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)  # nearest even
    return q.view(np.uint8), np.ascontiguousarray(inv).view(np.uint8)


def round_elements(fmt: QuantFormat, x: np.ndarray) -> np.ndarray:
    """Values in units of their block scale, rounded to the nearest element of the format
    (float32; E4M3 ties to even, E2M1 ties away from zero, both clipped to range)."""
    if fmt.method == "mxfp4":
        return np.copysign(FP4_VALUES[_e2m1_code(x)], x)
    clipped = np.clip(x, -FP8_MAX, FP8_MAX).astype(np.float32)
    return clipped.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def regrid(fmt: QuantFormat, values: np.ndarray, scales: np.ndarray, factor: float):
    """Weights already on the format's grid (``decode``: values and per-element scales),
    rounded once more to the same format on a grid whose block scales are ``factor`` (one of
    ``REGRID_FACTORS``, in (1, 2)) times the stored ones.

    This is one fresh rounding of the tensor, of the kind requantizing an edited weight makes:
    the edit rounds PW, a tensor off the grid, to the nearest element at relative precision ε.
    Rounding a weight on its own grid changes nothing, and so does the grid scaled by 2 for
    FP8 (q/2 is an E4M3 value for every normal q); at 2^(1/4), 2^(1/2), 2^(3/4) every q/factor
    is off the grid (an irrational mantissa), so each element moves by a rounding error of at
    most ε of itself, spread over the interval as a projected weight's is. The block maximum
    lands at 448/factor (6/factor for E2M1), so nothing clips; deterministic, so verify's
    tolerance is reproducible."""
    shifted = scales * np.float32(factor)
    return round_elements(fmt, values / shifted) * shifted


def _e2m1_code(x: np.ndarray) -> np.ndarray:
    """The E2M1 magnitude code (0-7) nearest to ``|x|``, ties away from zero, clipped at 6."""
    return np.searchsorted(FP4_MIDPOINTS, np.minimum(np.abs(x), FP4_MAX), side="right")


def _encode_mxfp4(w: np.ndarray, stored: np.ndarray | None = None):
    """Per 32 elements the exponent e = ⌈log2(amax/6)⌉ (so amax / 2**e ≤ 6), each element
    rounded to the nearest E2M1 value (ties away from zero), packed two per byte; with
    ``stored`` exponents, those kept where amax / 2**e ≤ ``KEEP_LIMIT`` (``encode``)."""
    rows, cols = w.shape
    blocks = np.asarray(w, dtype=np.float32).reshape(rows, cols // MX_BLOCK, MX_BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    mantissa, exp = np.frexp(amax / np.float32(FP4_MAX))  # exact: mantissa in [0.5, 1)
    exp = np.where(mantissa == 0.5, exp - 1, exp)  # a power of two is its own ceiling
    exp = np.where(amax > 0, np.clip(exp, E8M0_MIN, E8M0_BIAS), -E8M0_BIAS).astype(np.int32)
    if stored is not None:
        old = stored.reshape(exp.shape).astype(np.int32) - E8M0_BIAS
        limit = np.ldexp(np.float32(KEEP_LIMIT["mxfp4"]), old)
        exp = np.where((old > -E8M0_BIAS) & (amax <= limit), old, exp)
    scaled = blocks / np.ldexp(np.float32(1), exp)[..., None]
    code = _e2m1_code(scaled).astype(np.uint8)
    code |= np.signbit(scaled).astype(np.uint8) << 3
    code = code.reshape(rows, cols)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed, (exp + E8M0_BIAS).astype(np.uint8)


def stored_weight(
    checkpoint, name: str, axis: int, fmt: QuantFormat | None
) -> tuple[str, str | None, int]:
    """(name on disk, scale tensor or None, residual axis of the dequantized tensor) of a
    planned weight: itself for a float tensor; for a quantized one its stored form, checked
    against its scales. gpt-oss stores MXFP4 experts transposed, ``[experts, d_model, in]``
    (``<name>_blocks``), where the float checkpoint has ``[experts, in, d_model]``."""
    if fmt is None:
        return name, None, axis
    if fmt.method == "mxfp4" and name not in checkpoint.tensors:
        blocks = name + "_blocks"
        if blocks in checkpoint.tensors and axis == 2:
            return blocks, check_scales(checkpoint, blocks, fmt), 1
        return name, None, axis
    info = checkpoint.tensors.get(name)
    if info is None or info.dtype != fmt.dtype:
        return name, None, axis
    if len(info.shape) != 2:
        raise UnsupportedModelError(
            f"tensor {name} is a {len(info.shape)}-D {fmt.method} tensor; orthoedit keeps 2-D "
            f"FP8 weights quantized. {DEQUANTIZE_FIRST}"
        )
    return name, check_scales(checkpoint, name, fmt), axis


def dequantized(folder: Path) -> dict:
    """``from_pretrained`` options for a quantized checkpoint orthoedit edits (FP8 blocks,
    MXFP4): dequantize on load, into the requested dtype, on any device. The hooks and verify
    reason about plain float layers, and FP8 kernels would also quantize the activations."""
    from transformers import FineGrainedFP8Config, Mxfp4Config

    fmt = quant_format(json.loads((Path(folder) / "config.json").read_text()), folder)
    if fmt is None:
        return {}
    config = Mxfp4Config if fmt.method == "mxfp4" else FineGrainedFP8Config
    return {"quantization_config": config(dequantize=True)}
