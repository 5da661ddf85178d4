"""attribute's report: the ranked components, patching, the cumulative curve and the
layer x head map."""

from __future__ import annotations

from pathlib import Path

from .common import signed


def attribute_markdown(result) -> str:
    """Ranked components, the first-order estimate against real patching, the cumulative
    curve and the components that push the other way."""
    s = result.settings
    comps = result.components
    full = result.ablated - result.baseline
    checked = [c for c in comps if c.patched is not None]
    checked.sort(key=lambda c: -abs(c.estimate))
    lines = [
        "# Refusal attribution",
        "",
        f"- model `{s['model']}` ({s['family']}, {s['n_layers']} layers, {s['n_heads']} heads)",
        f"- direction `{s['direction']}` (sha256 `{s['direction_sha256'][:16]}…`)",
        f"- {s['counts']['harmful']} harmful prompts ({s['harmful']}), "
        f"{s['counts']['harmless']} harmless ({s['harmless']}); refusal tokens "
        + ", ".join(f"`{t}`" for t in s["refusal_tokens"]),
        "- at the last prompt token, in refusal log-odds of the first answer token; a "
        "component is *patched* by shifting its output by (harmless mean − harmful mean)",
        "",
        "| | refusal log-odds |",
        "|---|---|",
        f"| harmful prompts | {result.baseline:.3f} |",
        f"| harmless prompts | {result.harmless:.3f} |",
        f"| harmful, direction ablated everywhere | {result.ablated:.3f} ({full:+.3f}) |",
        "",
        *_checks(result.checks, s["dtype"]),
        *_estimates(checked, s["steps"]),
        *_cumulative(result),
    ]
    lines += _carriers(comps)
    lines += ["", "Plots: `cumulative.png`, `heads.png`.", ""]
    return "\n".join(lines)


def _estimates(checked: list, steps: int) -> list[str]:
    """The patched components: both estimates against the patched effect."""
    lines = [
        "## Estimates vs real patching (largest estimates)",
        "",
        "*first order*: the gradient at the harmful activations × (harmless mean − harmful "
        f"mean); *integrated*: the gradient averaged at {steps} points of the path on "
        "which every component moves to its harmless mean together (the ranking); *patched*: "
        "the real change when this component alone is shifted.",
        "",
        "| component | first order | integrated | patched | first order / patched | "
        "integrated / patched | projection harmful | projection harmless |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checked:
        r1 = c.first_order / c.patched if c.patched else float("nan")
        r2 = c.estimate / c.patched if c.patched else float("nan")
        lines.append(
            f"| {c.name} | {c.first_order:+.3f} | {c.estimate:+.3f} | {signed(c.patched)} | "
            f"{r1:.2f} | {r2:.2f} | {c.harmful_proj:+.3f} | {c.harmless_proj:+.3f} |"
        )
    if checked:
        agree = [c for c in checked if c.patched and abs(c.estimate / c.patched - 1) <= 0.2]
        lines += [
            "",
            f"Integrated estimates within 20% of real patching: {len(agree)} of {len(checked)}. "
            "Where they differ, components interact: the real single-component effects (not the "
            "estimates) are the numbers to quote.",
        ]
    return lines


def _cumulative(result) -> list[str]:
    """The strongest components patched together, as a share of the full ablation."""
    full = result.ablated - result.baseline
    lines = [
        "",
        "## Cumulative: the strongest components patched together",
        "",
        "| components | last added | estimated | patched | share of full ablation |",
        "|---|---|---|---|---|",
    ]
    for step in result.cumulative:
        share = (step["patched"] - result.baseline) / full if full else float("nan")
        lines.append(
            f"| {step['k']} | {step.get('last', '–')} | {step['estimate']:.3f} | "
            f"{step['patched']:.3f} | {share:.0%} |"
        )
    return lines


def _carriers(comps) -> list[str]:
    """The components that carry refusal (negative estimates, strongest first) and those that
    push the other way."""
    suppress = [c for c in comps if c.estimate < 0]
    promote = [c for c in comps if c.estimate > 0]
    lines = [
        "",
        f"## Components that carry refusal ({len(suppress)}, strongest first)",
        "",
        "Patching them toward the harmless mean lowers refusal.",
        "",
        "| rank | component | estimate | projection harmful | projection harmless |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {i} | {c.name} | {c.estimate:+.3f} | {c.harmful_proj:+.3f} | {c.harmless_proj:+.3f} |"
        for i, c in enumerate(suppress, 1)
    ]
    lines += [
        "",
        f"## Components that push the other way ({len(promote)})",
        "",
        "Patching them toward the harmless mean *raises* refusal.",
        "",
        "| component | estimate | projection harmful | projection harmless |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c.name} | {c.estimate:+.3f} | {c.harmful_proj:+.3f} | {c.harmless_proj:+.3f} |"
        for c in sorted(promote, key=lambda c: -c.estimate)
    ]
    return lines


def _cumulative_png(result, path: Path) -> None:
    """Components patched together, strongest first, against refusal log-odds."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = result.settings
    steps = result.cumulative
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ks = [p["k"] for p in steps]
    ax.plot(ks, [p["patched"] for p in steps], "o-", label="patched (measured)", color="#1f77b4")
    ax.plot(ks, [p["estimate"] for p in steps], "s--", label="sum of the estimates",
            color="#ff7f0e", markersize=4)  # fmt: skip
    ax.axhline(result.baseline, color="#7f7f7f", lw=1, ls=":", label="harmful, no patch")
    ax.axhline(result.harmless, color="#2ca02c", lw=1, ls=":", label="harmless prompts")
    ax.axhline(result.ablated, color="#d62728", lw=1, ls="-.", label="direction ablated")
    ax.set_xlabel("components patched together (strongest first)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("refusal log-odds (harmful prompts)")
    title = s["model"] if len(s["model"]) <= 70 else "..." + s["model"][-67:]
    ax.set_title(f"How many components explain refusal: {title}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attribute_pngs(result, folder: Path) -> None:
    """``cumulative.png`` (components patched, strongest first, vs refusal log-odds) and
    ``heads.png`` (layer × head map of the first-order effect, MLPs and embeddings beside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _cumulative_png(result, folder / "cumulative.png")
    s = result.settings
    n_layers, n_heads = s["n_layers"], max(1, s["n_heads"])
    grid = np.full((n_layers, n_heads + 2), np.nan)  # heads, bias, MLP
    embed = [c for c in result.components if c.kind == "embed"]
    for c in result.components:
        if c.kind == "head":
            grid[c.layer, c.head] = c.estimate
        elif c.kind == "bias":
            grid[c.layer, n_heads] = c.estimate
        elif c.kind == "mlp":  # a layer's experts and shared expert add up
            cell = grid[c.layer, n_heads + 1]
            grid[c.layer, n_heads + 1] = c.estimate + (0.0 if np.isnan(cell) else cell)
    has_bias = any(c.kind == "bias" for c in result.components)
    if not has_bias:
        grid = np.delete(grid, n_heads, axis=1)
    labels = [f"H{h}" for h in range(n_heads)] + (["bias"] if has_bias else []) + ["MLP"]
    limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    width = min(16.0, max(5.0, 2.5 + 0.45 * len(labels)))
    fig, ax = plt.subplots(figsize=(width, min(12.0, 1.5 + 0.32 * n_layers)))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90 if n_heads > 16 else 0)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.axvline(n_heads - 0.5, color="black", lw=1)
    ax.set_xlabel("attention head | " + ("bias | " if has_bias else "") + "MLP")
    ax.set_ylabel("layer")
    note = ", ".join(f"{c.name} {c.estimate:+.2f}" for c in embed)
    ax.set_title(
        "estimated change of refusal log-odds\nwhen patched (blue lowers refusal)"
        + (f"\nembeddings: {note}" if note else ""),
        fontsize=8,
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(folder / "heads.png", dpi=110)
    plt.close(fig)


def _checks(found: dict, dtype: str) -> list[str]:
    """The three checks of the estimates against patching, each with its number and bound;
    patched in a 16-bit ``dtype``, a word on what its rounding does to small effects."""
    if not found:
        return []
    rank, whole, linear = found["ranking"], found["completeness"], found["linearity"]

    def verdict(ok: bool) -> str:
        return "**holds**" if ok else "**fails**"

    rho = "n/a" if rank["spearman"] is None else f"{rank['spearman']:.3f}"
    error = "n/a" if whole["relative_error"] is None else f"{whole['relative_error']:.1%}"
    median = linear["median_abs_error"]
    return [
        "## Checks: can the estimates stand in for patching?",
        "",
        f"- **ranking**: Spearman correlation between the integrated estimate and the patched "
        f"effect over the {rank['components']} components with the largest patched effects "
        f"({rank['chosen_by']}): {rho} (at least {rank['minimum']:g}): "
        f"{verdict(rank['passed'])}",
        f"- **completeness**: the estimates sum to {whole['sum_of_estimates']:+.3f}; patching "
        f"every component at once moves the log-odds {whole['patched_together']:+.3f}: "
        f"{error} apart (at most {whole['maximum']:.0%}): {verdict(whole['passed'])}",
        f"- **linearity**: {len(linear['components'])} components patch by less than "
        f"{linear['fraction_of_gap']:.0%} of the saturation gap "
        f"({linear['saturation_gap']:.3f} log-odds, harmful to harmless)"
        + (
            f"; there the estimate is {linear['median_estimate_over_patched']:.2f} × the patched "
            f"effect (median), {median:.0%} off (median)"
            if median is not None
            else ""
        )
        + (
            f". Patched in {dtype}: its rounding can be as large as "
            "these small effects, so judge linearity in float32 (`--dtype float32`, or re-patch "
            "a sample with `benchmarks/attribute_precision.py`)"
            if dtype != "float32" and linear["components"]
            else ""
        ),
        "",
    ]
