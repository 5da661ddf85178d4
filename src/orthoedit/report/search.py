"""search's report (pareto.md, pareto.png): the front, the chosen trial and the
baselines."""

from __future__ import annotations

from pathlib import Path


def _profile(params: dict, site: str) -> str:
    """A shape profile in one cell, or a free profile's weights, layer by layer."""
    from ..search.space import free_weights

    free = free_weights(params, site)
    if free is not None:
        return " ".join(f"{w:.2f}" for w in free)
    return (
        f"{params[f'{site}_peak_weight']:.2f} @ L{params[f'{site}_peak_layer']:.1f} "
        f"±{params[f'{site}_width']:.1f} (edge ×{params[f'{site}_edge_frac']:.2f})"
    )


def failure_text(o: dict) -> str:
    """``12.5% (3 refused, 1 broken of 32)`` from a search outcome's dict, with the judge's
    evasive and unjudged counts when there are any (the search's log lines and its report)."""
    kinds = ("refused", "complied", "broken", "evasive", "unjudged")
    n = sum(o.get(k) or 0 for k in kinds)
    extra = "".join(f", {o[k]} {k}" for k in ("evasive", "unjudged") if o.get(k))
    return f"{o['failure']:.1%} ({o['refused']} refused, {o['broken']} broken{extra} of {n})"


def _space_lines(report: dict) -> list[str]:
    """What was minimized over which space, and the drop objective, when the search had them."""
    lines = []
    if "minimized" in report:
        space = report["space"]
        embed = {(False, True): "searched", (True,): "always", (False,): "never"}
        lo, hi = space["layers"]
        lines += [
            f"- minimized: {report['minimized']}",
            f"- space: direction layer {lo:g}–{hi:g}, positions "
            f"{', '.join(map(str, space['positions']))}; {space['profile']} profiles for attn "
            f"and mlp; embedding edited: {embed[tuple(space['embed'])]}",
        ]
    if "drop" in report["objectives"]:
        base = report["judging"].get("eval_base_score")
        lines.append(
            f"- drop: {report['objectives']['drop']}; unedited score {base:.4g}"
            if base is not None
            else f"- drop: {report['objectives']['drop']}"
        )
    return lines


def search_markdown(report: dict) -> str:
    """``orthoedit search``: the baselines, the chosen trial and the Pareto front."""
    s = report["settings"]
    chosen = report["chosen"]
    lines = [
        "# Edit search: refusal vs damage",
        "",
        f"- model `{s['model']}`; study `{report['study']}` in `{report['storage']}`",
        f"- {report['trials_completed']} completed trials ({report['trials_wanted']} wanted); "
        f"sampler: {report['sampler']}, seed {s['seed']}",
        f"- failure: {report['objectives']['failure']} ({s['counts']['harmful']} prompts, "
        f"at most {s['max_new_tokens']} tokens)",
        f"- KL: {report['objectives']['kl']} ({s['counts']['harmless']} prompts)",
    ]
    lines += _space_lines(report)
    drop = "drop" in report["objectives"]
    strong = report.get("front")
    budget = report.get("budget") or f"KL ≤ {report['max_kl']:g}"
    lines += [
        (
            f"- budget {budget}: the chosen trial is the lowest KL within it (ties: lower "
            "failure, then the earlier trial)"
            if report.get("max_failure") is not None
            else f"- budget {budget}: the chosen trial is the lowest failure within it "
            "(ties: lower KL, then the earlier trial)"
        ),
        *_front_note(report.get("front")),
        "",
    ]
    lines += _summary(report, chosen, budget, drop, strong)
    lines.append("")
    if chosen is not None:
        lines += [
            f"Reproduce it: `{' '.join(['orthoedit', 'apply', *chosen['apply_args']])} --out "
            "edited` (also in `chosen/apply.txt`).",
            "",
        ]
    lines += _confirmation(report.get("confirmation"))
    lines += _front(report, chosen, drop, lambda o: f" {o['drop']:.4g} |" if drop else "")
    return "\n".join(lines)


def _summary(report: dict, chosen: dict | None, budget: str, drop: bool, strong) -> list[str]:
    """The baselines and the chosen trial, with their scores judged again where they were."""
    lines = [
        "| edit | failure (harmful) |"
        + (" failure, judged again |" if strong else "")
        + " KL (harmless) |"
        + (" drop |" if drop else ""),
        "|---|---|---|" + ("---|" if strong else "") + ("---|" if drop else ""),
    ]

    def tail(o: dict) -> str:
        return f" {o['drop']:.4g} |" if drop else ""

    for name, o in report["baselines"].items():
        what = "measure's selection, every writer" if name == "measure" else "unedited model"
        again = f" {failure_text(strong['baselines'][name])} |" if strong else ""
        lines.append(f"| {what} | {failure_text(o)} |{again} {o['kl']:.4f} |{tail(o)}")
    if chosen is None:
        empty = " |" * (1 + bool(strong) + drop)
        lines.append(f"| chosen | none within {budget} |{empty}")
    else:
        again = f" {failure_text(chosen['strong'])} |" if strong else ""
        lines.append(
            f"| **chosen: trial {chosen['number']}** | {failure_text(chosen)} |{again} "
            f"{chosen['kl']:.4f} |{tail(chosen)}"
        )
    return lines


def _confirmation(found: dict | None) -> list[str]:
    """pareto.md's confirmation section (``search --confirm``), when there is one."""
    if not found:
        return []
    rates = found["summary"]
    judged = bool(found["judge"])
    verdict = "**confirmed**" if found["confirmed"] else "**not confirmed**"
    lines = [
        "## Confirmation on held-out prompts",
        "",
        f"Trial {found['trial']} applied and judged beside the unedited model as eval safety "
        f"does: {found['counts']['harmful']} harmful prompts from {found['harmful']}, "
        f"{found['counts']['harmless']} harmless from {found['harmless']}, greedy answers of at "
        f"most {found['max_new_tokens']} tokens ({found['backend']}); every answer in "
        f"`{found['report']}`. {verdict}: the harmful prompts fail "
        f"{found['failure']['model']:.1%} with the edit against {found['failure']['base']:.1%} "
        "without it.",
        "",
        "| rate | unedited | edited |",
        "|---|---|---|",
        f"| harmful: failure | {found['failure']['base']:.1%} | {found['failure']['model']:.1%} |",
    ]
    keys = ["refusal", "broken"] + (["evasive", "unjudged"] if judged else [])
    for kind in ("harmful", "harmless"):
        for key in keys:
            cells = [rates[role][kind].get(key) for role in ("base", "model")]
            shown = ["–" if v is None else f"{v:.1%}" for v in cells]
            lines.append(f"| {kind}: {key} | {shown[0]} | {shown[1]} |")
    return [*lines, ""]


def _front_note(front: dict | None) -> list[str]:
    """How the front was judged again, when it was."""
    if not front:
        return []
    judge = f" and judged by {front['judge']} ({front['judge_style'] or 'its default style'})"
    return [
        f"- the front judged again before the choice: answers of {front['max_new_tokens']} "
        f"tokens{judge if front['judge'] else ', phrases only'}; the choice uses these scores "
        f"(trials {', '.join(map(str, front['judged'])) or 'none'})"
    ]


def _again(t: dict) -> str:
    return failure_text(t["strong"]) if t.get("strong") else "–"


def _front(report: dict, chosen: dict | None, drop: bool, tail) -> list[str]:
    """pareto.md's front: one row per trial on it, with its direction and profiles."""
    by_number = {t["number"]: t for t in report["trials"]}
    strong = bool(report.get("front"))
    head = ["trial", "failure", *(["judged again"] if strong else []), "refused", "broken"]
    head += ["KL", *(["drop"] if drop else [])]
    head += ["direction", "attn", "mlp", "embed"]
    lines = [
        "## Pareto front",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for number in report["pareto"]:
        t = by_number[number]
        d, p = t["direction"], t["params"]
        where = "+".join(
            f"{w:.2f}×L{layer}" for layer, w in zip(d["layers"], d["weights"], strict=True)
        )
        mark = " (chosen)" if chosen and number == chosen["number"] else ""
        again = f" {_again(t)} |" if strong else ""
        lines.append(
            f"| {number}{mark} | {t['failure']:.1%} |{again} {t['refused']} | {t['broken']} | "
            f"{t['kl']:.4f} |{tail(t)} {where}, pos {d['position']} | {_profile(p, 'attn')} | "
            f"{_profile(p, 'mlp')} | {'yes' if p['embed'] else 'no'} |"
        )
    return [
        *lines,
        "",
        (
            "Profiles: one weight per layer, from layer 0."
            if report.get("space", {}).get("profile") == "free"
            else "Profiles: peak weight @ peak layer ± width, falling off linearly to the edge "
            "weight (a fraction of the peak), 0 beyond."
        )
        + " Every trial, with its parameters: `pareto.json`.",
        "",
    ]


def search_png(report: dict, path: Path, title: str) -> None:
    """Failure rate vs KL: every trial faint, the Pareto front joined, the chosen trial and the
    baselines marked, the KL budget dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = report["trials"]
    by_number = {t["number"]: t for t in trials}
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    ax.scatter(
        [t["kl"] for t in trials],
        [t["failure"] for t in trials],
        s=14,
        color="#1f77b4",
        alpha=0.3,
        label="trials",
    )
    front = [by_number[n] for n in report["pareto"]]
    ax.plot(
        [t["kl"] for t in front],
        [t["failure"] for t in front],
        "o-",
        color="#1f77b4",
        ms=5,
        drawstyle="steps-post",
        label="Pareto front",
    )
    marks = {"no edit": ("s", "#7f7f7f"), "measure": ("D", "#ff7f0e")}
    for name, o in report["baselines"].items():
        shape, colour = marks[name]
        label = "measure's selection" if name == "measure" else "unedited"
        ax.scatter([o["kl"]], [o["failure"]], marker=shape, s=60,
                   color=colour, label=label, zorder=3)  # fmt: skip
    chosen = report["chosen"]
    if chosen is not None:
        ax.scatter([chosen["kl"]], [chosen["failure"]], marker="*", s=220, color="#d62728",
                   label=f"chosen (trial {chosen['number']})", zorder=4)  # fmt: skip
    if report.get("max_failure") is not None:
        rate = report.get("max_failure_rate", report["max_failure"])
        ax.axhline(rate, color="#555555", ls="--", lw=1, label="failure budget")
    else:
        ax.axvline(report["max_kl"], color="#555555", ls="--", lw=1, label="KL budget")
    ax.set_xscale("symlog", linthresh=1e-3)  # linear near 0 (the unedited model), log beyond
    ax.set_xlim(left=0)
    ax.set_xlabel("first-token KL, harmless validation prompts (linear below 1e-3)")
    ax.set_ylabel("failure rate, harmful validation prompts\n(refused or broken)")
    ax.set_ylim(-0.03, 1.03)
    short = title if len(title) <= 60 else "..." + title[-57:]
    ax.set_title(f"edit search: {short} ({len(trials)} trials)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
