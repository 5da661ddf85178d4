"""The planned quantized weights rounded once more, in the loaded model: what the format's own
rounding does to this model's logits (verify's tolerance for quantized checkpoints,
docs/design.md "Quantized checkpoints"; for a GGUF's edit, ``requantized_plainly``).

Weights are rounded in place, one matrix at a time from the checkpoint, and put back from the
checkpoint on exit: no copy of the model or of its weights is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from ..edit.plan import Plan
from ..edit.requant import QuantMatrix, matrices
from ..model.checkpoint import Checkpoint
from ..model.quant import regrid
from .hooks import resolve


def _quant_matrices(checkpoint: Checkpoint, op) -> Iterator[QuantMatrix]:
    """The stored matrices of a planned quantized tensor (one, or one per expert)."""
    weight, scales = checkpoint.tensors[op.tensor], checkpoint.tensors[op.scales]
    return matrices(
        checkpoint.quant, checkpoint.shard(weight), weight, checkpoint.shard(scales), scales
    )


def _views(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every matrix among a module's parameters, as a view (and its transpose): a Linear's
    weight, or each expert of a fused ``[experts, a, b]`` parameter."""
    for param in module.parameters():
        mats = [param] if param.ndim == 2 else list(param.unbind(0)) if param.ndim == 3 else []
        for mat in mats:
            yield mat
            yield mat.T


def _find(module: nn.Module, weight: np.ndarray, taken: list[torch.Tensor]):
    """The view of the module's parameters that holds ``weight`` as the model loaded it (the
    dequantized values in the model's dtype), or None (not among them, or not in memory)."""
    for view in _views(module):
        if tuple(view.shape) != weight.shape or view.device.type == "meta":
            continue
        if any(view.data_ptr() == t.data_ptr() for t in taken):  # identical experts, say
            continue
        if torch.equal(view, torch.from_numpy(weight).to(view.device, view.dtype)):
            return view
    return None


@contextlib.contextmanager
def rounded_again(
    model: nn.Module, plan: Plan, checkpoint: Checkpoint, factor: float
) -> Iterator[list[str]]:
    """Inside, every planned quantized weight of ``model`` (loaded dequantized from
    ``checkpoint``) is replaced by ``model.quant.regrid`` of it on the grid scaled by
    ``factor``: one fresh rounding in its own format. Yields the planned tensors it could not
    find in the model (then they are left as they are); on exit every rounded weight is the
    checkpoint's again."""
    done: list[tuple[torch.Tensor, QuantMatrix]] = []
    missing: list[str] = []
    try:
        for op in plan.ops:
            if not op.scales:
                continue
            module = resolve(model, op.module)
            for m in _quant_matrices(checkpoint, op):
                values, scales = m.load(0, m.rows)
                view = _find(module, values, [v for v, _ in done])
                if view is None:
                    missing.append(op.tensor)
                    continue
                with torch.no_grad():
                    view.copy_(torch.from_numpy(regrid(m.fmt, values, scales, factor)))
                done.append((view, m))
        yield missing
    finally:
        with torch.no_grad():
            for view, m in done:
                view.copy_(torch.from_numpy(m.load(0, m.rows)[0]))


@contextlib.contextmanager
def requantized_plainly(model: nn.Module, plan: Plan, source) -> Iterator[tuple[int, list[str]]]:
    """GGUF (``source`` a ``GgufCheckpoint``): inside, every planned weight the edit writes in
    a quantized type is the nearest rounding, in that type, of the exact projection of its
    dequantized source (no feedback): the types' own rounding of the edited weights, for R.
    Yields (how many were replaced, planned tensors not found in memory); on exit every
    replaced weight is the source's again."""
    from gguf import GGMLQuantizationType, dequantize

    from ..edit.gguf_types import FLOAT_KINDS, quantize, target
    from ..edit.ortho import orthogonalize
    from ..edit.plan import op_basis

    done: list[tuple[torch.Tensor, np.ndarray]] = []
    missing: list[str] = []
    try:
        for op in plan.ops:
            shape = source.tensors[op.tensor].shape
            kind = target(source.source[op.tensor][0].type_name, shape[-1])[0]
            if len(shape) == 1 or kind in FLOAT_KINDS:
                continue
            values = source.read(op.tensor).astype(np.float32)
            view = _find(resolve(model, op.module), values, [v for v, _ in done])
            if view is None:
                missing.append(op.tensor)
                continue
            exact = orthogonalize(values, op_basis(op, plan, source), op.axis, op.scale)
            rows = np.asarray(exact, dtype=np.float32).reshape(-1, shape[-1])
            rounded = dequantize(quantize(rows, kind), GGMLQuantizationType[kind])
            with torch.no_grad():
                view.copy_(torch.from_numpy(np.asarray(rounded).reshape(shape)))
            done.append((view, values))
        yield len(done), missing
    finally:
        with torch.no_grad():
            for view, values in done:
                view.copy_(torch.from_numpy(values))
