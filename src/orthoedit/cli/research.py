"""Research: study sites (where the direction must go) and attribute (who writes it)."""

from __future__ import annotations

from ..config import AttributeConfig, StudySitesConfig
from . import tables, ui
from .app import app, study_app
from .options import command


@command(study_app, "sites", StudySitesConfig)
def sites(cfg: StudySitesConfig) -> None:
    """Which sites must lose the direction to remove refusal.

    The conditions: baseline, run-time ablation at the block inputs, attention outputs, MLP
    outputs or all three, and the weight edits apply would make (embed, attn, mlp, all);
    refusal log-odds, refusal rate and KL of each, and with --judge the unsafe rate."""
    from ..research.sites import study_sites

    with ui.progress() as progress:
        result = ui.guarded(lambda: study_sites(cfg, log=ui.log, progress=progress), cfg.out)
    ui.out.print(tables.sites(result))
    ui.out.print(result.finding, markup=False, soft_wrap=True)
    folder = result.out
    ui.wrote(f"{folder}/sites.json, {folder}/sites.md, {folder}/sites.png")


@command(app, "attribute", AttributeConfig)
def attribute(cfg: AttributeConfig) -> None:
    """Rank the heads and MLPs that carry refusal, checked by real patching.

    Every embedding, attention head and MLP is read at the last prompt token, ranked by the
    first-order change of the refusal log-odds when patched from the harmful to the harmless
    mean, the top ones checked by real patching, with the cumulative curve and a layer x
    head map."""
    from ..research.attribute import attribute as run_attribute

    with ui.progress() as progress:
        result = ui.guarded(lambda: run_attribute(cfg, log=ui.log, progress=progress), cfg.out)
    ui.out.print(tables.attribution(result, cfg.top))
    ui.out.print(
        f"harmful {result.baseline:.3f}, harmless {result.harmless:.3f}, direction ablated "
        f"{result.ablated:.3f} (refusal log-odds)"
    )
    rank, whole = result.checks["ranking"], result.checks["completeness"]
    rho, error = rank["spearman"], whole["relative_error"]
    ui.out.print(
        "checks: ranking (Spearman, top "
        f"{rank['components']} by patched effect) {'n/a' if rho is None else f'{rho:.3f}'}, "
        f"{'holds' if rank['passed'] else 'fails'}; completeness (estimates vs all patched) "
        f"{'n/a' if error is None else f'{error:.1%} apart'}, "
        f"{'holds' if whole['passed'] else 'fails'}"
    )
    ui.wrote(f"{result.out}/attribution.md, attribution.json, cumulative.png, heads.png")
