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

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import AttributeConfig
from ..edit.plan import build_plan
from ..errors import BadInputError
from ..judging.openings import FILTER_TOKENS
from ..model.source import resolve_model
from ..output import check_target, inputs_of
from ..prompts import load_sets
from ..runtime.hooks import plan_hooks
from ..runtime.session import Session, generate, run_dtype, start_stage
from .components import (
    Component,
    _shifts_for,
    gather,
    mean_log_odds,
    running,
    shifted,
    writers_of,
)


@dataclass
class Attribution:
    out: Path
    components: list[Component]
    baseline: float  # mean refusal log-odds on harmful prompts
    harmless: float  # ... on harmless prompts
    ablated: float  # ... on harmful prompts with the direction ablated everywhere
    cumulative: list[dict]
    settings: dict
    checks: dict = field(default_factory=dict)  # ranking, completeness, linearity (``checks``)


def every_writer(folder: Path, direction_path: Path, direction_layer: int | None = None):
    """(config, table, checkpoint, direction, plan) for a local model (folder or GGUF), the plan
    covering every residual writer (the tied embedding too: ``tied_policy="edit"``)."""
    from ..model.derive import table_or_derived
    from ..model.direction import load_direction
    from ..model.source import open_checkpoint, read_config

    config = read_config(folder)
    table = table_or_derived(config)
    d_model, n_layers, _ = table.dims(config)
    direction = load_direction(direction_path, d_model, n_layers, direction_layer)
    checkpoint = open_checkpoint(folder)
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
    from ..judging.openings import (
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
    progress = start_stage(cfg.device, progress)
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
            [g.ids for g in generate(session, rows[k], FILTER_TOKENS)]
            for k in ("harmful", "harmless")
        )

    token_ids = refusal_token_ids(tok, cfg.direction, cfg.refusal_tokens, completions)
    writers = running(model, writers_of(model, table, plan, checkpoint), rows["harmful"][0])
    components = [c for w in writers for c in w.components]
    log(f"{len(components)} components in {len(writers)} writers; {len(token_ids)} refusal tokens")

    harm_lo, safe_lo, deltas = _estimate(cfg, model, writers, rows, token_ids, pad, progress)
    baseline, harmless = float(np.mean(harm_lo)), float(np.mean(safe_lo))
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
    together = patch(_shifts_for(components, deltas))  # every component patched at once

    settings = _settings(cfg, revision, direction, table, plan, writers, prompts, tok, token_ids)
    settings["dtype"] = run_dtype(folder, cfg)  # auto resolved
    found = checks(ranked, baseline, harmless, together, every=cfg.patch_all)
    result = Attribution(target, ranked, baseline, harmless, ablated, cumulative, settings, found)
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
            "checks": result.checks,
        }
        (tmp / "attribution.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "attribution.md").write_text(attribute_markdown(result))
        attribute_pngs(result, tmp)


def _settings(cfg, revision, direction, table, plan, writers, prompts, tok, token_ids) -> dict:
    """attribution.json's settings: the model, direction, prompts and how it was measured."""
    from ..prompts import prompt_digest

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
    """Real patching: each of the ``cfg.top`` largest estimates alone, or with ``patch_all``
    every component (set on the component),
    and the refusal-suppressing ones together, growing prefixes of the ranking (returned as
    the cumulative curve). ``patch(shifts)`` is the harmful prompts' mean log-odds."""
    suppressing = [c for c in ranked if c.estimate < 0]
    alone = ranked if cfg.patch_all else sorted(ranked, key=lambda c: -abs(c.estimate))[: cfg.top]
    progress.start("real patching, one component at a time", len(alone))
    for c in alone:
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


#: The ranking check: the components with the largest patched effects, and the rank
#: correlation their integrated estimates must reach.
RANK_N, RANK_MIN = 20, 0.8
#: The completeness check: the estimates' sum against patching every component at once.
COMPLETE_MAX = 0.1
#: A component is in the linear regime when its patched effect is below this fraction of the
#: saturation gap (harmful to harmless log-odds).
LINEAR_FRACTION = 0.1


def _ranks(values: list[float]) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        same = x == value
        ranks[same] = ranks[same].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs or a constant side)."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def checks(components, baseline: float, harmless: float, together: float, every: bool) -> dict:
    """How far the integrated estimates can stand in for patching, by criteria that hold on
    any model and can fail: the rank correlation with patching over the ``RANK_N`` components
    with the largest patched effects (chosen by the estimates unless ``every`` component was
    patched, which biases the check toward agreement); the estimates' sum against patching
    all of them at once; and, in the linear regime, the estimate over the patched effect."""
    patched = [c for c in components if c.patched is not None]
    top = sorted(patched, key=lambda c: -abs(c.patched))[:RANK_N]
    rho = spearman([c.estimate for c in top], [c.patched for c in top])
    total = together - baseline
    estimated = float(sum(c.estimate for c in components))
    error = abs(estimated - total) / abs(total) if total else None
    gap = abs(harmless - baseline)
    linear = [c for c in patched if c.patched and abs(c.patched) < LINEAR_FRACTION * gap]
    ratios = [c.estimate / c.patched for c in linear]
    return {
        "ranking": {
            "components": len(top),
            "chosen_by": "patched effect, every component patched"
            if every
            else f"patched effect, among the {len(patched)} largest estimates",
            "spearman": rho,
            "minimum": RANK_MIN,
            "passed": rho is not None and rho >= RANK_MIN,
        },
        "completeness": {
            "sum_of_estimates": estimated,
            "patched_together": total,
            "relative_error": error,
            "maximum": COMPLETE_MAX,
            "passed": error is not None and error <= COMPLETE_MAX,
        },
        "linearity": {
            "fraction_of_gap": LINEAR_FRACTION,
            "saturation_gap": gap,
            "components": [c.name for c in linear],
            "median_estimate_over_patched": float(np.median(ratios)) if ratios else None,
            "median_abs_error": float(np.median(np.abs(np.asarray(ratios) - 1)))
            if ratios
            else None,
        },
    }
