"""``orthoedit attribute``: which residual-stream writers carry refusal (docs/design.md §7).

The components are the writers of the architecture table, cut finer where the math allows:
each embedding, each attention head (its slice of the output projection: head h adds
``W_O[:, h] z_h``, where ``z_h`` is the head's attention-weighted value; the projection's bias,
when there is one, is a component of its own), and each MLP. Everything is read at the last
prompt position, where the first answer token is predicted, and in refusal log-odds.

For each component c, over harmful and harmless prompts:

- **projection**: the mean of ``uᵀ c`` (u the unit vector ``apply`` would project that writer
  against: r̂, or the norm-adjusted one for post-norm writers);
- **first-order effect**: the change of the harmful prompts' mean refusal log-odds when c's
  output is shifted by ``Δ_c = mean_harmless(c) − mean_harmful(c)`` (patched from the harmful
  mean to the harmless mean), estimated as ``mean_p ∂ logodds_p / ∂ c · Δ_c``: one backward
  pass gives every component's gradient (heads of a layer share the gradient of their sum);
- **integrated estimate** (the ranking key): the same product with the gradient averaged at
  ``steps`` points of the straight path on which *every* component moves from its harmful
  to its harmless mean together (integrated gradients: the estimates add up to the effect of
  patching all of them). Where refusal saturates, the gradient at the harmful activations
  alone misses components whose effect only shows once others have moved;
- **real patching** of the top components (the same shift, applied by a hook, one component
  at a time), which checks the estimates, and a cumulative curve: the strongest components
  patched together, strongest first, against the refusal log-odds.

Components are defined at the writer's linear output, before any post-norm, so for Gemma 2/3
and OLMo 2 the shift and the gradient live in that space (which is where ``apply`` edits).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import AttributeConfig
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


@dataclass
class Attribution:
    out: Path
    components: list[Component]
    baseline: float  # mean refusal log-odds on harmful prompts
    harmless: float  # ... on harmless prompts
    ablated: float  # ... on harmful prompts with the direction ablated everywhere
    cumulative: list[dict]
    settings: dict


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
                block = table.blocks.mlp.format(layer=op.layer)
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


def _batches(rows: list[list[int]], batch_size: int, pad: int, device):
    from ..runtime.session import left_padded, length_sorted_batches

    for batch in length_sorted_batches([len(r) for r in rows], batch_size):
        yield batch, left_padded([rows[i] for i in batch], pad, device)


def _log_odds(model, enc, token_ids: list[int]) -> torch.Tensor:
    from ..measure.select import log_odds

    logits = model(**enc, logits_to_keep=1).logits[:, -1].float()
    return log_odds(torch.log_softmax(logits, -1), token_ids)


def gather(model, writers, rows, token_ids, batch_size, pad, with_grad: bool):
    """Per writer: components ``[n_rows, n_components, d]``, and (``with_grad``) the gradient
    of each row's refusal log-odds with respect to the writer's output ``[n_rows, d]``."""
    device = next(model.parameters()).device
    outs: dict[str, list] = {w.module: [None] * len(rows) for w in writers}
    grads: dict[str, list] = {w.module: [None] * len(rows) for w in writers}
    values = [0.0] * len(rows)
    for batch, enc in _batches(rows, batch_size, pad, device):
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
        for _, enc in _batches(rows, batch_size, pad, device):
            total += float(_log_odds(model, enc, token_ids).sum())
    return total / len(rows)


def _shifts_for(components: list[Component], deltas: dict[str, torch.Tensor]) -> dict:
    """Per writer module, the summed shift of the given components (heads add linearly)."""
    shifts: dict[str, torch.Tensor] = {}
    for c in components:
        shifts[c.module] = shifts.get(c.module, 0) + deltas[c.name]
    return shifts


def every_writer(folder: Path, direction_path: Path, direction_layer: int | None = None):
    """(config, table, checkpoint, direction, plan) for a local model folder, the plan
    covering every residual writer (the tied embedding too: ``tied_policy="edit"``)."""
    from ..edit.plan import build_plan
    from ..model.architectures import table_for_config
    from ..model.checkpoint import Checkpoint
    from ..model.direction import load_direction
    from ..model.source import read_config

    config = read_config(folder)
    table = table_for_config(config)
    d_model, n_layers, _ = table.dims(config)
    direction = load_direction(direction_path, d_model, n_layers, direction_layer)
    checkpoint = Checkpoint.open(folder)
    plan = build_plan(
        table=table,
        checkpoint=checkpoint,
        config=config,
        direction=direction,
        source=str(folder),
        tied_policy="edit",
    )
    return config, table, checkpoint, direction, plan


def refusal_token_ids(tok, direction_path: Path, spec: str | None, completions) -> list[int]:
    """``--refusal-tokens``, else measure's (``scores.json`` beside the direction), else
    derived from the model's own completions (``completions()`` -> harmful, harmless ids)."""
    from ..measure.select import (
        first_tokens,
        measured_refusal_openings,
        parse_refusal_tokens,
        refusal_tokens,
    )

    if spec:
        return parse_refusal_tokens(tok, spec)
    measured = measured_refusal_openings(tok, direction_path)
    if measured is not None:
        return first_tokens(measured)
    harmful, harmless = completions()
    return refusal_tokens(tok, harmful, harmless, lambda m: None)


def attribute(
    cfg: AttributeConfig,
    log: Callable[[str], None] = print,
    progress=None,
) -> Attribution:
    """Attribute refusal to the residual writers of ``cfg.model``; writes the report."""
    import transformers

    from ..edit.plan import build_plan
    from ..evaluate.safety import load_sets
    from ..model.source import resolve_model
    from ..output import check_target, inputs_of
    from ..progress import Progress
    from ..runtime.hooks import plan_hooks
    from ..runtime.refusal import greedy_completions
    from ..runtime.session import Session, check_device

    transformers.utils.logging.disable_progress_bar()
    progress = progress or Progress()
    check_device(cfg.device)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config, table, checkpoint, direction, plan = every_writer(
        folder, cfg.direction, cfg.direction_layer
    )
    target = check_target(cfg.out, [folder, *inputs_of(cfg)], cfg.overwrite)
    prompts = load_sets(cfg)
    for kind, items in prompts.items():
        if len(items) < 2:
            raise BadInputError(f"--{kind}: {len(items)} prompts; attribution needs at least 2.")
    session = Session.open(folder, cfg)
    model, tok, pad = session.model, session.tok, session.pad
    model.requires_grad_(False)
    rows = {k: session.rows(v) for k, v in prompts.items()}

    def completions():
        progress.start("refusal tokens (greedy completions)", None)
        return tuple(
            greedy_completions(model, rows[k], cfg.batch_size, pad, 16)
            for k in ("harmful", "harmless")
        )

    token_ids = refusal_token_ids(tok, cfg.direction, cfg.refusal_tokens, completions)
    writers = writers_of(model, table, plan, checkpoint)
    components = [c for w in writers for c in w.components]
    log(f"{len(components)} components in {len(writers)} writers; {len(token_ids)} refusal tokens")

    harm_lo, safe_lo, deltas = _estimate(cfg, model, writers, rows, token_ids, pad, progress)
    baseline = float(np.mean(harm_lo))
    harmless = float(np.mean(safe_lo))
    shipped = build_plan(  # what apply would ship: every site, the table's tied policy
        table=table, checkpoint=checkpoint, config=config, direction=direction, source=str(folder)
    )
    with torch.no_grad(), plan_hooks(model, shipped, checkpoint):
        ablated = mean_log_odds(model, rows["harmful"], token_ids, cfg.batch_size, pad)

    ranked = sorted(components, key=lambda c: c.estimate)  # most refusal-suppressing first
    patch = lambda shifts: mean_log_odds(  # noqa: E731
        model, rows["harmful"], token_ids, cfg.batch_size, pad, shifts
    )
    cumulative = _patch(cfg, ranked, deltas, baseline, patch, progress)

    settings = _settings(cfg, revision, direction, table, plan, writers, prompts, tok, token_ids)
    result = Attribution(target, ranked, baseline, harmless, ablated, cumulative, settings)
    _write(result)
    return result


def _write(result: Attribution) -> None:
    """attribution.json, attribution.md and the figures, staged into the output folder."""
    from ..output import staged_output
    from ..report import attribute_markdown, attribute_pngs

    with staged_output(result.out) as tmp:
        record = {
            "settings": result.settings,
            "baseline_log_odds": result.baseline,
            "harmless_log_odds": result.harmless,
            "ablated_log_odds": result.ablated,
            "components": [asdict(c) for c in result.components],
            "cumulative": result.cumulative,
        }
        (tmp / "attribution.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "attribution.md").write_text(attribute_markdown(result))
        attribute_pngs(result, tmp)


def _settings(cfg, revision, direction, table, plan, writers, prompts, tok, token_ids) -> dict:
    """attribution.json's settings: the model, direction, prompts and how it was measured."""
    from ..measure.candidates import prompt_digest

    return {
        "model": cfg.model,
        "revision": revision,
        "direction": str(cfg.direction),
        "direction_sha256": direction.sha256,
        "direction_layer": cfg.direction_layer,
        "family": table.family,
        "n_layers": plan.n_layers,
        "n_heads": max((w.n_heads for w in writers), default=0),
        "harmful": cfg.harmful or "bundled (test split)",
        "harmless": cfg.harmless or "bundled (test split)",
        "counts": {k: len(v) for k, v in prompts.items()},
        "prompt_hashes": {k: prompt_digest(v) for k, v in prompts.items()},
        "seed": cfg.seed,
        "refusal_tokens": tok.convert_ids_to_tokens(token_ids),
        "system": cfg.system,
        "dtype": cfg.dtype,
        "position": "last prompt token",
        "patch": "component output shifted by mean_harmless - mean_harmful",
        "steps": cfg.steps,
        "orthoedit_version": __version__,
    }


def _estimate(cfg, model, writers, rows, token_ids, pad, progress):
    """Every component's first-order and integrated estimates of the change in refusal
    log-odds when patched from the harmful to the harmless mean, and its mean projections on
    the direction (set on the components); the harmful and harmless log-odds per prompt and
    each component's patch (harmless mean minus harmful mean)."""
    components = [c for w in writers for c in w.components]
    progress.start("activations and gradients: harmful prompts", None)
    harm_out, harm_grad, harm_lo = gather(
        model, writers, rows["harmful"], token_ids, cfg.batch_size, pad, with_grad=True
    )
    progress.start("activations: harmless prompts", None)
    safe_out, _, safe_lo = gather(
        model, writers, rows["harmless"], token_ids, cfg.batch_size, pad, with_grad=False
    )
    deltas: dict[str, torch.Tensor] = {}
    for w in writers:  # the mean differences first: the path below needs them all
        shift = safe_out[w.module].double().mean(0) - harm_out[w.module].double().mean(0)
        for i, c in enumerate(w.components):
            deltas[c.name] = shift[i].float()
    path_grads: dict[str, torch.Tensor] = {}
    if cfg.steps:
        progress.start("integrated gradients along the harmful-to-harmless path", cfg.steps)
    for k in range(cfg.steps):
        alpha = (k + 0.5) / cfg.steps
        moved = {name: d * alpha for name, d in deltas.items()}
        with shifted(model, _shifts_for(components, moved)):
            _, g, _ = gather(
                model, writers, rows["harmful"], token_ids, cfg.batch_size, pad, with_grad=True
            )
        for module, grads in g.items():
            path_grads[module] = path_grads.get(module, 0) + grads.double().mean(0) / cfg.steps
        progress.advance()
    for w in writers:
        mean_harm = harm_out[w.module].double().mean(0)  # [n_components, d]
        mean_safe = safe_out[w.module].double().mean(0)
        grad = harm_grad[w.module].double().mean(0)  # [d]
        path = path_grads[w.module] if path_grads else grad
        u = w.u.double()
        for i, c in enumerate(w.components):
            delta = mean_safe[i] - mean_harm[i]
            deltas[c.name] = delta.float()
            c.harmful_proj = float(mean_harm[i] @ u)
            c.harmless_proj = float(mean_safe[i] @ u)
            c.first_order = float(grad @ delta)
            c.estimate = float(path @ delta)
    return harm_lo, safe_lo, deltas


def _patch(cfg, ranked, deltas, baseline: float, patch, progress) -> list[dict]:
    """Real patching: each of the ``cfg.top`` largest estimates alone (set on the component),
    and the refusal-suppressing ones together, growing prefixes of the ranking (returned as
    the cumulative curve). ``patch(shifts)`` is the harmful prompts' mean log-odds."""
    suppressing = [c for c in ranked if c.estimate < 0]
    progress.start("real patching of the top components", min(cfg.top, len(ranked)))
    for c in sorted(ranked, key=lambda c: -abs(c.estimate))[: cfg.top]:
        c.patched = patch(_shifts_for([c], deltas)) - baseline
        progress.advance()
    steps = _steps(min(cfg.cumulative, len(suppressing)))
    progress.start("cumulative patching", len(steps))
    cumulative = [{"k": 0, "estimate": baseline, "patched": baseline}]
    for k in steps:
        chosen = suppressing[:k]
        estimate = baseline + sum(c.estimate for c in chosen)
        lo = patch(_shifts_for(chosen, deltas))
        cumulative.append({"k": k, "estimate": estimate, "patched": lo, "last": chosen[-1].name})
        progress.advance()
    return cumulative


def _steps(n: int) -> list[int]:
    """1..n, every step up to 10 and then sparser (each a forward pass over the prompts)."""
    steps = list(range(1, min(n, 10) + 1))
    k = 10
    while k < n:
        k = min(n, int(k * 1.5))
        steps.append(k)
    return steps
