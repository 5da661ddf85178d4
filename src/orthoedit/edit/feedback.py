"""Rounding-aware requantization: the projected weight rounded to its grid, then the rounding's
leftover along the basis fed back into the target until none is left (docs/design.md,
"Quantized checkpoints" and "GGUF").

Rounding a projected weight PW to a quantized grid puts back much of the component the
projection removed: the edit moves each element by about 1/√d_model of itself, less than a grid
step, so most elements round back to the value they had (62% of the component stayed in Q4_K
on the development model, 64% in MXFP4 at gpt-oss's width). What is left, ``U Q(T) − U PW`` per
written vector (a column of a ``[d_model, in]`` weight, a row of an embedding), is subtracted
from the target T and the weight rounded again. One mechanism for every quantized writer: the
GGUF edit (``gguf_write``) and FP8 / MXFP4 safetensors (``requant``) pass their own rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .ortho import column_coefficients, norm_factors, remove_columns_, remove_rows_

#: Roundings of one weight at most (the first, plain one included).
PASSES = 8
#: The feedback stops once ‖U Q(T) − U PW‖ ≤ this × ‖W‖: bfloat16's rounding (2^-8 of each
#: element) of the projected weight leaves about that much of the span.
FLOOR = 2.0**-9
#: Threads that round row blocks at once (numpy and ggml release the GIL).
WORKERS = max(1, min(8, os.cpu_count() or 1))
POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="orthoedit-round")

#: ``rounded(block, i0)``: rows ``i0:`` of the target rounded to the format and written;
#: returns them as stored (dequantized), or None where the storage is float (no feedback).
Rounded = Callable[[np.ndarray, int], "np.ndarray | None"]


def columns(
    load: Callable[[int, int], np.ndarray],
    blocks: list[tuple[int, int]],
    q: np.ndarray,
    scale: float,
    preserve: bool,
    rounded: Rounded,
    passes: int = PASSES,
    map_: Callable[..., Iterable] = POOL.map,
    floor: float = FLOOR,
) -> None:
    """A ``[d_model, in]`` weight in row blocks (``load(i0, i1)``, fresh each time: a pass
    projects in place): ``U W`` and the column norms from every block, then the projection
    rounded a block at a time (``rounded``), once per pass; each pass writes every block, and
    the last pass writes the best. ``map_`` runs the blocks (on every core, or in turn);
    ``floor``: the leftover, relative to ‖W‖, below which no pass follows."""

    def first_pass(block_range: tuple[int, int]):
        i0, i1 = block_range
        block = load(i0, i1)
        return column_coefficients(block, q[:, i0:i1]), np.einsum("ij,ij->j", block, block)

    parts = list(map_(first_pass, blocks))
    coeff = np.atleast_2d(sum(c for c, _ in parts))
    sq = sum(s for _, s in parts)
    factors = None
    if preserve:
        factors = norm_factors(sq, np.einsum("kj,kj->j", coeff, coeff), scale)
    target = (1.0 - scale) * coeff * (1.0 if factors is None else factors)

    def one(shift: np.ndarray, block_range: tuple[int, int]) -> np.ndarray:
        i0, i1 = block_range
        block = load(i0, i1)
        remove_columns_(block, q[:, i0:i1], coeff + shift / scale, scale, factors)
        back = rounded(block, i0)
        if back is None or passes == 1:
            return np.zeros_like(coeff)
        return np.atleast_2d(column_coefficients(back.astype(block.dtype), q[:, i0:i1]))

    def run(shift: np.ndarray) -> np.ndarray:
        return sum(map_(lambda b: one(shift, b), blocks)) - target

    best = drive(run, np.zeros_like(coeff), passes, floor * float(np.sqrt(sq.sum())), axis=1)
    if best is not None:
        run(best)


def rows(
    base: np.ndarray,
    q: np.ndarray,
    scale: float,
    preserve: bool,
    requantize: Callable[[np.ndarray], tuple[object, np.ndarray | None]],
    passes: int = PASSES,
    floor: float = FLOOR,
):
    """Rows that are writers each (an embedding's), projected in place, then requantized with
    feedback within the block: ``requantize(values)`` gives (what to write, the values as
    stored or None for a float type). Returns what to write of the best pass."""
    remove_rows_(base, q, scale, preserve)
    target = base @ q.T
    kept: dict = {}

    def run(shift: np.ndarray) -> np.ndarray:
        data, back = requantize(base - shift @ q)
        kept["data"] = data
        if back is None or passes == 1:
            return np.zeros_like(target)
        return back.astype(base.dtype) @ q.T - target

    best = drive(run, np.zeros_like(target), passes, floor * float(np.linalg.norm(base)), axis=0)
    if best is not None:
        run(best)
    return kept["data"]


def drive(run, shift: np.ndarray, passes: int, floor: float, axis: int):
    """Drive ``run(shift)`` (requantize with the target moved by ``shift``: ``T = PW − Uᵀ
    shift``; returns the component left, ``U Q(T) − U PW``, one row or column per written
    vector along ``axis``) towards none.

    Each entry of the leftover falls as its shift grows (a larger shift moves every element
    of the vector further along u, and each element that crosses a rounding boundary moves the
    component by |u_i| times its grid step, always the same way), so each entry's shift is the
    root of a monotone step function, found on its own: while its leftover keeps its sign, the
    next shift is the best so far plus ``gain`` times the leftover (the gain doubling each time
    nothing moved: the push was too small to take any element across a boundary); once two
    shifts bracket the root, the secant between them, kept inside the bracket. Stops at
    ``floor`` (what rounding the projection to bfloat16 would leave), at a hundredth of the
    first leftover, or after ``passes``. Returns the best shifts when the last run was not them
    (the caller runs them once more), else None."""
    left = run(shift)
    first = float(np.linalg.norm(left))
    best_shift, best_left = shift.copy(), left
    # the bracket: the last shift that left a positive (too little pushed) and a negative entry
    lo, lo_left = np.where(left > 0, shift, -np.inf), np.where(left > 0, left, np.nan)
    hi, hi_left = np.where(left < 0, shift, np.inf), np.where(left < 0, left, np.nan)
    gain = np.ones_like(shift)
    last_best = True
    for _ in range(passes - 1):
        if float(np.linalg.norm(best_left)) <= max(0.01 * first, floor):
            break
        trial = _next(best_shift, best_left, gain, lo, lo_left, hi, hi_left)
        left = run(trial)
        better = np.abs(left) < np.abs(best_left)
        gain = np.where(left == best_left, gain * 2.0, gain)
        best_shift = np.where(better, trial, best_shift)
        best_left = np.where(better, left, best_left)
        lo, lo_left = np.where(left > 0, trial, lo), np.where(left > 0, left, lo_left)
        hi, hi_left = np.where(left < 0, trial, hi), np.where(left < 0, left, hi_left)
        last_best = bool(better.all())
    return None if last_best else best_shift


def _next(shift, left, gain, lo, lo_left, hi, hi_left) -> np.ndarray:
    """The next shift of every entry: the secant within its bracket where it has one (kept a
    tenth of the bracket away from either end, so the bracket shrinks), else a push of
    ``gain`` × its leftover past its best."""
    push = shift + gain * left
    bracketed = np.isfinite(lo) & np.isfinite(hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        secant = lo + lo_left * (hi - lo) / (lo_left - hi_left)
        width = hi - lo
        secant = np.clip(secant, lo + 0.1 * width, hi - 0.1 * width)
    return np.where(bracketed, secant, push)
