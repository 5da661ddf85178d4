"""PNG figures of the selection scores (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

import math
from pathlib import Path


def _heat_map(fig, ax, grid, cmap: str, hatch_over: float | None) -> None:
    """``grid`` [position, layer] as a heat map with its colour bar, NaN grey; cells over
    ``hatch_over`` hatched."""
    import matplotlib
    import numpy as np
    from matplotlib.patches import Rectangle

    cm = matplotlib.colormaps[cmap].with_extremes(bad="#d9d9d9")
    finite = grid[np.isfinite(grid)]
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cm,
        aspect="auto",
        interpolation="nearest",
        vmin=float(finite.min()) if finite.size else None,
        vmax=float(finite.max()) if finite.size else None,
    )
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    if hatch_over is not None:
        for y, x in zip(*np.nonzero(np.isfinite(grid) & (grid > hatch_over)), strict=True):
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="//", lw=0))


def plot_scores(scores: dict, n_layers: int, tokens: list[str], path: Path, title: str) -> None:
    """Heat maps of bypass, induce and KL over layer x post-instruction position.

    ``scores`` is :meth:`Selection.to_dict`: unscored candidates (pruned, too deep, no
    difference) are NaN and drawn grey; the chosen candidate is ringed; the KL map shows the
    budget in its title and hatches the cells over it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_pos = len(tokens)
    grids = {name: np.full((n_pos, n_layers), np.nan) for name in ("bypass", "induce", "kl")}
    for s in scores["scores"]:
        for name, grid in grids.items():
            grid[s["position"] + n_pos, s["layer"]] = s[name]
    chosen = scores["chosen"] or scores["nearest"]
    ringed = "chosen" if scores["chosen"] else "no candidate passed; lowest bypass"
    base = scores["baseline"]
    max_kl = scores["thresholds"]["max_kl"]
    panels = (
        (
            "bypass",
            f"bypass: refusal log-odds, harmful, ablated\n(base {base['harmful_log_odds']:.2f}; "
            "lower is better)",
            "viridis",
        ),
        (
            "induce",
            f"induce: refusal log-odds, harmless, added\n(base {base['harmless_log_odds']:.2f}; "
            f"kept: >= {scores['thresholds']['min_induce']:.2f})",
            "magma",
        ),
        ("kl", f"first-token KL, harmless, ablated\n(budget {max_kl:g}; hatched: over)", "cividis"),
    )
    width = min(30.0, max(8.0, 3.0 + 0.35 * n_layers))
    fig, axes = plt.subplots(3, 1, figsize=(width, 1.0 + 3 * (1.6 + 0.3 * n_pos)), squeeze=False)
    for ax, (name, label, cmap) in zip(axes[:, 0], panels, strict=True):
        _heat_map(fig, ax, grids[name], cmap, max_kl if name == "kl" else None)
        ax.plot(
            chosen["layer"], chosen["position"] + n_pos, "o", ms=14, mfc="none", mec="red", mew=2
        )
        ax.set_title(label, fontsize=10)
        ax.set_yticks(
            range(n_pos), [f"{p - n_pos}: {t!r}" for p, t in enumerate(tokens)], fontsize=8
        )
        step = max(1, math.ceil(n_layers / 32))
        ax.set_xticks(range(0, n_layers, step))
        ax.set_xlabel("layer (input of block)")
    fig.suptitle(
        f"{title}\n{ringed}: layer {chosen['layer']}, position {chosen['position']} (red ring); "
        "grey: not scored",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
