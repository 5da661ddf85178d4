"""study sites' report: each set of sites' effect, in a table and a figure."""

from __future__ import annotations

from pathlib import Path

from .common import pct, share

SITES_WHAT = {
    "run time": "r̂ projected out of the activations by hooks, at every layer and position "
    "(residual: the block inputs; attn, mlp: the module outputs; all: the three together, the "
    "paper's directional ablation; residual, one layer: the input of the block the direction "
    "was measured at, alone)",
    "weight edit": "exactly what `orthoedit apply --sites ...` writes (default tied policy), "
    "run through the plan's hooks, its verified run-time equivalent",
}


def sites_markdown(report: dict) -> str:
    """``orthoedit study sites``: one row per condition, and the finding in one line."""
    s = report["settings"]
    conditions = report["conditions"]
    judged = s["judge"] is not None
    tokens = ", ".join(f"`{''.join(o)}`" for o in report["refusal_openings"])
    lines = [
        "# Where refusal lives: intervention sites",
        "",
        f"- model `{s['model']}`; direction `{s['direction']}` (sha256 "
        f"`{s['direction_sha256'][:16]}…`); tied embeddings: {s['tied_policy'] or 'not tied'}",
        *(
            f"- {kind} prompts: {s['prompt_sources'][kind]} ({s['counts'][kind]}, sha256 "
            f"`{s['prompt_hashes'][kind][:16]}…`)"
            for kind in ("harmful", "harmless")
        ),
        f"- refusal openings {tokens} ({report['refusal_tokens_from']})",
        "- log-odds: mean log-odds that an answer to a harmful prompt opens with a refusal "
        "opening (teacher-forced); "
        "Δ: change from the baseline (a log Bayes factor); share: Δ over the Δ of the full "
        "run-time ablation",
        f"- refusal: greedy answers to the harmful prompts (at most {s['max_new_tokens']} "
        "tokens) with a refusal phrase anywhere; failure: every answer not complied (refused, "
        "broken" + (f", or evasive or unjudged by {s['judge']})" if judged else ")"),
        "- KL: first-token KL(baseline ‖ condition) on the harmless prompts",
        *(f"- {kind}: {what}" for kind, what in SITES_WHAT.items()),
        "",
        f"**Finding:** {report['finding']}",
        "",
    ]
    head = ["condition", "sites", "log-odds", "Δ vs baseline", "share of full effect", "refusal"]
    guard = judged and any(c.get("unsafe") is not None for c in conditions)
    head += ["evasive (judge)"] * judged + ["unsafe (judge)"] * guard + ["failure"]
    head += ["KL"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in conditions:
        cells = [c["kind"], f"{c['name']} ({c['sites']})" if c["kind"] != "baseline" else "–"]
        if c["log_odds"] is None:
            cells += ["n/a"] * (len(head) - 2)
        else:
            cells += [f"{c['log_odds']:.3f}", f"{c['delta']:+.3f}", share(c["share"])]
            cells.append(pct(c["refusal"]))
            cells += [pct(c.get("evasive"))] * judged + [pct(c.get("unsafe"))] * guard
            cells.append(pct(c.get("failure")))
            cells.append(f"{c['kl']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [c for c in conditions if c["note"]]
    if notes:
        lines.append("")
        lines += [f"- {c['kind']}: {c['name']}: {c['note']}" for c in notes]
    lines += ["", "Every number, with the settings: `sites.json`.", ""]
    return "\n".join(lines)


def _bars(ax, bars: list, key: str, fmt: str) -> None:
    """One labelled bar per condition's ``key`` ("n/a" where it has none)."""
    for xi, c, colour in bars:
        value = c[key]
        if value is None:  # not applicable (e.g. no embedding edit under 'skip')
            where = ("data", "axes fraction")
            ax.annotate("n/a", (xi, 0.5), xycoords=where, ha="center", color="#555555")
            continue
        ax.bar(xi, value, 0.8, color=colour)
        ax.annotate(
            fmt.format(value),
            (xi, value),
            ha="center",
            va="bottom" if value >= 0 else "top",
            fontsize=8,
            xytext=(0, 2 if value >= 0 else -2),
            textcoords="offset points",
        )


def sites_png(report: dict, path: Path, title: str) -> None:
    """Three panels (refusal log-odds, refusal rate, KL): run-time and weight-edit conditions
    as two groups of bars side by side, the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = report["conditions"]
    base = next(c for c in conditions if c["kind"] == "baseline")
    groups = [("run time", "#1f77b4"), ("weight edit", "#ff7f0e")]
    bars = []  # (x, condition, colour)
    x = 0.0
    centres = []
    for kind, colour in groups:
        mine = [c for c in conditions if c["kind"] == kind]
        centres.append((x + (len(mine) - 1) / 2, kind))
        for c in mine:
            bars.append((x, c, colour))
            x += 1
        x += 0.8  # gap between the groups
    panels = [
        ("log_odds", "refusal log-odds, harmful prompts", "{:.2f}"),
        ("refusal", "refusal rate, harmful prompts (greedy)", "{:.0%}"),
        ("kl", "first-token KL to the baseline, harmless prompts", "{:.3f}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (key, label, fmt) in zip(axes, panels, strict=True):
        _bars(ax, bars, key, fmt)
        if key != "kl" and base[key] is not None:  # the baseline's KL is 0 by definition
            ax.axhline(base[key], color="#333333", ls="--", lw=1.2)
            label += f"\n(dashed: baseline, {fmt.format(base[key])})"
        else:
            label += "\n(the baseline's is 0)"
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks([b[0] for b in bars], [_tick(b[1]) for b in bars], fontsize=9)
        for centre, kind in centres:
            ax.annotate(
                kind,
                (centre, 0),
                xycoords=("data", "axes fraction"),
                xytext=(0, -24),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=10,
                fontweight="bold",
            )
        ax.margins(y=0.15)
        if key == "refusal":
            ax.set_ylim(0, 1.12)
        ax.set_title(label, fontsize=10)
    fig.suptitle(
        (title if len(title) <= 90 else "..." + title[-87:])
        + ": removing the direction at each set of sites",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tick(condition: dict) -> str:
    """A bar's label: the condition's name; the one-layer residual condition by its layer."""
    if condition["name"].endswith("one layer"):
        return "residual\n" + condition["sites"].split(", ")[-1]
    return condition["name"]
