"""The dtype a model runs in when its options say ``auto``: chosen by the hardware the run is
on, never pinned by a recipe.

On a GPU (or any accelerator) the checkpoint's own dtype (bfloat16 or float16 where it is
stored so). On a CPU, the faster of the checkpoint's dtype and float32 for this machine: a CPU
with bfloat16 instructions (AVX512-BF16, AMX) runs a bfloat16 matmul several times faster than
float32, one without them (AVX2 only) several times slower. Which one it is is measured once
per process, by timing a matmul of the model's own MLP shape in each dtype (a few
milliseconds), and the answer is cached. A float32 checkpoint runs in float32.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DEVICE_MAPS

AUTO = "auto"
#: The stored dtypes (config.json's ``torch_dtype`` / ``dtype``) that may run as they are.
HALF = ("bfloat16", "float16")
#: Rows of the timed matmul (a batch of token positions), and the cap on each side of the
#: weight, so that timing a 70B model's MLP stays a few milliseconds and a few MB.
TIMED_ROWS = 32
MAX_SIDE = 4096
#: Timed repeats per dtype; the best one counts (another job on the machine only slows a run).
REPEATS = 5


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model runs in and why, as one log line."""

    dtype: str
    note: str


def resolve_dtype(
    requested: str,
    folder: Path,
    device: str | None = None,
    timer: Callable[[str, tuple[int, int]], float] | None = None,
) -> DtypeChoice:
    """``requested`` as it is, or for ``auto`` the dtype this machine runs ``folder`` fastest
    in (module docstring). ``timer(dtype, (d_in, d_out))``: seconds of one matmul of that
    shape (default: measured here, once per process and shape)."""
    if requested != AUTO:
        return DtypeChoice(requested, f"dtype {requested}")
    stored = checkpoint_dtype(folder)
    if stored not in HALF:
        return DtypeChoice("float32", f"dtype auto → float32 (the checkpoint's {stored})")
    if on_accelerator(device):
        return DtypeChoice(stored, f"dtype auto → {stored} (the checkpoint's, on {device})")
    shape = mlp_shape(folder)
    if timer is None:
        seconds = {d: timed_matmul(d, shape, torch.get_num_threads()) for d in (stored, "float32")}
    else:
        seconds = {d: timer(d, shape) for d in (stored, "float32")}
    return faster(stored, seconds, shape)


def faster(stored: str, seconds: dict[str, float], shape: tuple[int, int]) -> DtypeChoice:
    """The faster of ``stored`` and float32 by ``seconds`` (a tie goes to ``stored``: half the
    memory), with the ratio in its note."""
    half, full = seconds[stored], seconds["float32"]
    what = f"matmul {shape[0]}x{shape[1]}"
    if half <= full:
        ratio = full / max(half, 1e-12)
        return DtypeChoice(
            stored, f"dtype auto → {stored} ({what} {ratio:.1f}× faster than float32 on this CPU)"
        )
    ratio = half / max(full, 1e-12)
    return DtypeChoice(
        "float32", f"dtype auto → float32 ({stored} {what} {ratio:.1f}× slower on this CPU)"
    )


def on_accelerator(device: str | None) -> bool:
    """Whether ``device`` (a stage's --device) puts the model on a GPU: a device map does
    where torch sees one; no device is the CPU."""
    if device is None:
        return False
    if device in DEVICE_MAPS:
        return torch.cuda.is_available()
    return torch.device(device).type != "cpu"


def _config(folder: Path) -> dict:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):  # a GGUF, or no config: dequantized to float32
        return {}
    text = config.get("text_config")
    return config | text if isinstance(text, dict) else config


def checkpoint_dtype(folder: Path) -> str:
    """The dtype config.json says the weights are stored in (``float32`` where it says none:
    a GGUF is dequantized to it)."""
    config = _config(folder)
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(stored).removeprefix("torch.")


def mlp_shape(folder: Path) -> tuple[int, int]:
    """(d_model, MLP width) from config.json, each capped at ``MAX_SIDE``: the matmul most of
    a forward pass is made of."""
    config = _config(folder)
    d = config.get("hidden_size") or config.get("n_embd") or 1024
    width = config.get("intermediate_size") or config.get("n_inner") or 4 * d
    if isinstance(width, list):  # per-layer widths (some hybrid models)
        width = max(width)
    return min(int(d), MAX_SIDE), min(int(width), MAX_SIDE)


@functools.cache
def timed_matmul(dtype: str, shape: tuple[int, int], threads: int) -> float:
    """Best-of-``REPEATS`` seconds of ``[TIMED_ROWS, d] @ [d, width]`` in ``dtype`` on this
    CPU with ``threads`` threads (cached: measured once per process)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TIMED_ROWS, shape[0], generator=gen).to(getattr(torch, dtype))
    w = torch.randn(shape[1], shape[0], generator=gen).to(getattr(torch, dtype))
    torch.nn.functional.linear(x, w)  # warm-up: first-call dispatch and allocation
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best
