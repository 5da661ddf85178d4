"""The components ``attribute`` reads, and how it reads and moves them: each embedding,
attention head (its slice of the output projection) and MLP at the last prompt position
(``writers_of``, ``gather``), shifted by a hook (``shifted``), in refusal log-odds
(``mean_log_odds``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import BadInputError


@dataclass
class Component:
    name: str  # "embed_tokens", "L3.H5", "L3.attn_bias", "L3.mlp"
    kind: str  # embed / head / bias / mlp
    layer: int | None
    head: int | None
    module: str  # the writer module whose output carries it
    harmful_proj: float = 0.0
    harmless_proj: float = 0.0
    estimate: float = 0.0  # integrated estimate of the change of the mean refusal log-odds
    first_order: float = 0.0  # the gradient at the harmful activations times Δ
    patched: float | None = None  # the real change, for the components checked


@dataclass
class Writer:
    """A writer module and how to split its output into components."""

    module: str
    kind: str  # embed / attn / mlp
    layer: int | None
    u: torch.Tensor  # [d_model] float32 unit vector of the edit
    n_heads: int = 0
    head_dim: int = 0
    residual_axis: int = 0  # of the module's weight: 0 for Linear [d, in], 1 for Conv1D
    has_bias: bool = False
    components: list[Component] = field(default_factory=list)


def head_outputs(z: torch.Tensor, weight: torch.Tensor, n_heads: int, axis: int) -> torch.Tensor:
    """Per-head contributions ``[..., n_heads, d_model]`` of an output projection's input
    ``z: [..., n_heads * head_dim]`` (bias excluded). ``axis`` is the residual axis of
    ``weight``: 0 for a Linear ``[d_model, n_heads * head_dim]``, 1 for a Conv1D ``[in, d]``."""
    w = weight if axis == 0 else weight.T  # [d_model, n_heads * head_dim]
    head_dim = w.shape[1] // n_heads
    zh = z.reshape(*z.shape[:-1], n_heads, head_dim)
    wh = w.reshape(w.shape[0], n_heads, head_dim)
    return torch.einsum("...hk,dhk->...hd", zh.to(w.dtype), wh)


def n_attention_heads(model) -> int:
    config = model.config
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise BadInputError("the model's config names no number of attention heads.")
    return int(heads)


def writers_of(model, table, plan, checkpoint) -> list[Writer]:
    """Every writer module of the plan, with its components (heads split out)."""
    from ..edit.plan import unit_vector
    from ..runtime.hooks import resolve

    heads = n_attention_heads(model)
    writers: dict[str, Writer] = {}
    mlp_modules: dict[int | None, int] = {}
    for _module, layer in {(op.module, op.layer) for op in plan.ops if op.site == "mlp"}:
        mlp_modules[layer] = mlp_modules.get(layer, 0) + 1
    for op in plan.ops:
        if op.module in writers or op.tensor.endswith(".bias"):
            continue
        u = torch.from_numpy(unit_vector(op, plan.r, checkpoint)).float()
        w = Writer(op.module, op.site, op.layer, u, residual_axis=op.axis)
        module = resolve(model, op.module)
        if op.site == "embed":
            w.components = [Component(op.module.rsplit(".", 1)[-1], "embed", None, None, op.module)]
        elif op.site == "mlp":
            name = f"L{op.layer}.mlp"
            if mlp_modules[op.layer] > 1:  # experts, a shared expert: named after the module
                blocks = (t.format(layer=op.layer) for t in table.blocks.mlp)
                block = next((b for b in blocks if op.module.startswith(b)), "")
                name += op.module.removeprefix(block).removesuffix(".down_proj")
            w.components = [Component(name, "mlp", op.layer, None, op.module)]
        else:
            weight = module.weight
            width = weight.shape[1 - op.axis]
            if width % heads:
                raise BadInputError(
                    f"{op.module}: input width {width} is not a multiple of {heads} heads."
                )
            w.n_heads, w.head_dim = heads, width // heads
            w.has_bias = getattr(module, "bias", None) is not None
            w.components = [
                Component(f"L{op.layer}.H{h}", "head", op.layer, h, op.module) for h in range(heads)
            ]
            if w.has_bias:
                w.components.append(
                    Component(f"L{op.layer}.attn_bias", "bias", op.layer, None, op.module)
                )
        writers[op.module] = w
    return list(writers.values())


@torch.no_grad()
def running(model, writers: list[Writer], row: list[int]) -> list[Writer]:
    """The writers whose module runs on a text prompt (``row``): a multimodal projector
    writes image tokens only, and has no output to attribute on text."""
    from ..runtime.batching import input_device
    from ..runtime.hooks import resolve

    fired: set[str] = set()
    handles = [
        resolve(model, w.module).register_forward_hook(lambda *_, name=w.module: fired.add(name))
        for w in writers
    ]
    try:
        model(input_ids=torch.tensor([row], device=input_device(model)))
    finally:
        for h in handles:
            h.remove()
    return [w for w in writers if w.module in fired]


def _by_position(y: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch, seq, d]`` view of a module output; mixture-of-experts modules return their
    tokens flattened to ``[batch * seq, d]``."""
    return y if y.dim() == 3 else y.view(batch, -1, y.shape[-1])


def _batch_size(model, state: dict):
    """A pre-hook on the model recording the batch size of each forward in ``state``."""

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        state["batch"] = ids.shape[0]

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _last_outputs(writer: Writer, module, args, output, batch: int) -> torch.Tensor:
    """The writer's components at the last position: ``[batch, n_components, d_model]``."""
    y = output[0] if isinstance(output, tuple) else output
    if writer.kind != "attn":
        return _by_position(y, batch)[:, -1:, :].float()
    z = args[0][:, -1]
    heads = head_outputs(z.float(), module.weight.float(), writer.n_heads, writer.residual_axis)
    if writer.has_bias:
        bias = module.bias.float().expand(z.shape[0], 1, -1)
        heads = torch.cat([heads, bias], dim=1)
    return heads


@contextlib.contextmanager
def _capture(model, writers: list[Writer], probes: bool) -> Iterator[dict]:
    """Record each writer's components at the last position; with ``probes``, add a zero
    tensor to each writer's output there whose gradient is the log-odds' gradient."""
    from ..runtime.hooks import resolve

    seen: dict[str, torch.Tensor] = {}
    state: dict = {}
    handles = [_batch_size(model, state)]

    def hook_for(writer: Writer):
        def hook(module, args, output):
            batch = state["batch"]
            seen[writer.module] = _last_outputs(writer, module, args, output, batch).detach()
            if not probes:
                return None
            y = output[0] if isinstance(output, tuple) else output
            probe = torch.zeros(batch, y.shape[-1], dtype=y.dtype, device=y.device)
            probe.requires_grad_(True)
            seen[writer.module + "#probe"] = probe
            shift = torch.zeros_like(_by_position(y, batch))
            shift[:, -1] = probe
            y = y + shift.view(y.shape)
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    try:
        for w in writers:
            handles.append(resolve(model, w.module).register_forward_hook(hook_for(w)))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def shifted(model, shifts: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add ``shifts[module]`` ([d_model]) to each module's output at the last position."""
    from ..runtime.hooks import resolve

    state: dict = {}
    handles = [_batch_size(model, state)]

    def hook_for(delta: torch.Tensor):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            moved = _by_position(y, state["batch"]).clone()
            moved[:, -1] += delta.to(device=y.device, dtype=y.dtype)
            y = moved.view(y.shape)
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    try:
        for module, delta in shifts.items():
            handles.append(resolve(model, module).register_forward_hook(hook_for(delta)))
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(model, rows: list[list[int]], batch_size: int, pad: int, device):
    from ..runtime.batching import left_padded, length_sorted_batches, pads_safely

    equal = not pads_safely(model)
    for batch in length_sorted_batches([len(r) for r in rows], batch_size, equal):
        yield batch, left_padded([rows[i] for i in batch], pad, device)


def _log_odds(model, enc, token_ids: list[int]) -> torch.Tensor:
    from ..runtime.scores import log_odds

    logits = model(**enc, logits_to_keep=1).logits[:, -1].float()
    return log_odds(torch.log_softmax(logits, -1), token_ids)


def gather(model, writers, rows, token_ids, batch_size, pad, with_grad: bool):
    """Per writer: components ``[n_rows, n_components, d]``, and (``with_grad``) the gradient
    of each row's refusal log-odds with respect to the writer's output ``[n_rows, d]``."""
    device = next(model.parameters()).device
    outs: dict[str, list] = {w.module: [None] * len(rows) for w in writers}
    grads: dict[str, list] = {w.module: [None] * len(rows) for w in writers}
    values = [0.0] * len(rows)
    for batch, enc in _batches(model, rows, batch_size, pad, device):
        with _capture(model, writers, probes=with_grad) as seen, torch.set_grad_enabled(with_grad):
            lo = _log_odds(model, enc, token_ids)
            if with_grad:
                lo.sum().backward()
        for i, row in enumerate(batch):
            values[row] = float(lo[i].detach())
            for w in writers:
                outs[w.module][row] = seen[w.module][i].cpu()
                if with_grad:
                    grads[w.module][row] = seen[w.module + "#probe"].grad[i].float().cpu()
    model.zero_grad(set_to_none=True)
    stacked = {m: torch.stack(v) for m, v in outs.items()}
    g = {m: torch.stack(v) for m, v in grads.items()} if with_grad else {}
    return stacked, g, values


@torch.no_grad()
def mean_log_odds(model, rows, token_ids, batch_size, pad, shifts=None) -> float:
    device = next(model.parameters()).device
    total = 0.0
    with shifted(model, shifts or {}):
        for _, enc in _batches(model, rows, batch_size, pad, device):
            total += float(_log_odds(model, enc, token_ids).sum())
    return total / len(rows)


def _shifts_for(components: list[Component], deltas: dict[str, torch.Tensor]) -> dict:
    """Per writer module, the summed shift of the given components (heads add linearly)."""
    shifts: dict[str, torch.Tensor] = {}
    for c in components:
        shifts[c.module] = shifts.get(c.module, 0) + deltas[c.name]
    return shifts
