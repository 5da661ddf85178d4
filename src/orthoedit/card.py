"""The model card written next to the edited weights: metadata, summary and provenance."""

from __future__ import annotations

import platform
from pathlib import Path

from . import __version__
from .plan import Plan

TAGS = ["orthoedit", "abliterated", "refusal-direction", "orthogonalized"]


def _site_summary(plan: Plan) -> str:
    layers = sorted({op.layer for op in plan.ops if op.layer is not None})
    partial = {k: v for k, v in plan.scales.items() if v != 1.0}
    lines = [
        f"- sites: {', '.join(plan.sites)}",
        f"- layers: {plan.layers[0]}:{plan.layers[1]} of {plan.n_layers} ({len(layers)} edited)",
        f"- scales other than 1.0: {partial or 'none'}",
        f"- tensors edited: {len(plan.ops)}",
    ]
    return "\n".join(lines)


def render_card(plan: Plan, direction_path: Path):
    """The card as a huggingface_hub ModelCard (imported here: it is slow to import)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = plan.base_model
    data = ModelCardData(
        base_model=base,
        base_model_relation="finetune" if base else None,
        library_name="transformers",
        tags=TAGS,
    )
    tied = (
        f"tied embeddings, policy `{plan.tied_policy}`"
        + (" (lm_head.weight written as the original embedding)" if plan.write_lm_head else "")
        if plan.tied
        else "untied embeddings (no policy needed)"
    )
    source = f"`{plan.source}`" + (f" at revision `{plan.revision}`" if plan.revision else "")
    body = f"""
# {Path(plan.source).name} (orthogonalized)

This checkpoint is {source} with one direction removed from every tensor that writes into the
residual stream, by orthoedit {__version__}. The
architecture, shapes and dtypes are unchanged; inference costs exactly what the source costs.

**What changed:** no edited layer can write along the direction below, so behaviour that the
direction mediates (typically refusal) is weakened or removed. Everything else the model does
may change too; evaluate it before use. The source model's license and terms apply unchanged.

## Edit

- family: `{plan.family}` (d_model {plan.d_model}, {plan.n_layers} layers)
{_site_summary(plan)}
- embeddings: {tied}
- exact check: `orthoedit verify SOURCE THIS_FOLDER` compares this checkpoint with the source
  model under run-time ablation hooks; `plan.json` lists every edited tensor.

## Provenance

| | |
|---|---|
| source model | {source} |
| direction file | `{direction_path.name}` |
| direction SHA-256 | `{plan.direction_sha256}` |
| direction row (per-layer file) | {plan.direction_row if plan.direction_row is not None else "-"} |
| orthoedit | {__version__} |
| python | {platform.python_version()} |
"""
    if plan.warnings:
        body += "\n## Warnings at edit time\n\n" + "\n".join(f"- {w}" for w in plan.warnings) + "\n"
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body)
