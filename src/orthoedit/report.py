"""Evaluation reports: Markdown for people, a PNG to look at (JSON is written by the caller)."""

from __future__ import annotations

from pathlib import Path


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def bench_markdown(rows, settings: dict) -> str:
    """The benchmark regression report: one line per task and metric."""
    regressions = [r for r in rows if r.regressed]
    verdict = (
        f"**{len(regressions)} regression(s) beyond the threshold**"
        if regressions
        else "**No regression beyond the thresholds.**"
    )
    shots = settings["num_fewshot"]
    lines = [
        "# Benchmark regression report",
        "",
        f"- base: `{settings['base']}`",
        f"- edited: `{settings['edited']}`",
        f"- lm-eval {settings.get('lm_eval_version') or ''}, backend `{settings['backend']}`, "
        f"dtype `{settings['dtype']}`, chat template {'on' if settings['chat_template'] else 'off'}"
        f", few-shot {'task default' if shots is None else shots}, "
        f"limit {settings['limit'] if settings['limit'] is not None else 'none'}, "
        f"batch size {settings['batch_size']}, seed {settings['seed']}",
        f"- threshold: a drop of more than {settings['max_drop']:g} (absolute) fails"
        + (
            "; per task: "
            + ", ".join(f"{t} {v:g}" for t, v in sorted(settings["max_drop_task"].items()))
            if settings["max_drop_task"]
            else ""
        ),
        f"- beyond noise: {settings['noise']} (the two runs' stderrs combined)",
        "",
        verdict,
        "",
        "| task | metric | base | edited | delta | stderr | beyond noise | threshold | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        metric = r.metric if r.filter == "none" else f"{r.metric} ({r.filter})"
        arrow = "" if r.higher_is_better is None else (" ↑" if r.higher_is_better else " ↓")
        result = "**REGRESSION**" if r.regressed else ("ok" if r.threshold is not None else "–")
        lines.append(
            f"| {r.task} | {metric}{arrow} | {_num(r.base)} | {_num(r.edited)} | "
            f"{r.delta:+.4f} | {_num(r.stderr)} | {'yes' if r.beyond_noise else 'no'} | "
            f"{_num(r.threshold, 3)} | {result} |"
        )
    n = settings.get("n_samples") or {}
    if n:
        lines += [
            "",
            "Samples per task: "
            + ", ".join(
                f"{t} {v.get('effective', '?')} of {v.get('original', '?')}"
                for t, v in sorted(n.items())
            ),
        ]
    lines += [
        "",
        "↑ higher is better, ↓ lower is better. lm-eval's raw results are in `lm_eval/`.",
        "",
    ]
    return "\n".join(lines)


def bench_png(rows, path: Path, title: str) -> None:
    """Base and edited side by side per task and metric, with ±1 stderr bars; regressions red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r.task}\n{r.metric}" for r in rows] or ["(no metrics)"]
    base = np.array([r.base for r in rows] or [0.0])
    edited = np.array([r.edited for r in rows] or [0.0])
    err_base = np.array([r.stderr_base or 0.0 for r in rows] or [0.0])
    err_edited = np.array([r.stderr_edited or 0.0 for r in rows] or [0.0])
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.5))
    ax.bar(x - 0.2, base, 0.4, yerr=err_base, capsize=3, label="base", color="#7f7f7f")
    colours = ["#d62728" if r.regressed else "#1f77b4" for r in rows] or ["#1f77b4"]
    ax.bar(x + 0.2, edited, 0.4, yerr=err_edited, capsize=3, label="edited", color=colours)
    for i, r in enumerate(rows):
        top = max(r.base, r.edited)
        ax.annotate(
            f"{r.delta:+.3f}",
            (i, top),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 4),
            textcoords="offset points",
        )
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title if len(title) <= 90 else "..." + title[-87:], fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


SAMPLES_PER_CATEGORY = 2
SAMPLE_CHARS = 240


def safety_markdown(summary: dict, settings: dict, records) -> str:
    """Refusal, unsafe (judge) and broken rates side by side, per category, with samples."""
    roles = list(summary)
    judged = settings["judge"] is not None
    names = {"base": f"base (`{settings['base']}`)", "model": f"model (`{settings['model']}`)"}
    lines = [
        "# Safety evaluation",
        "",
        *(f"- {names[r]}" for r in roles),
        f"- harmful prompts: {settings['harmful']}; harmless prompts: {settings['harmless']}",
        f"- greedy answers of at most {settings['max_new_tokens']} tokens, chat template applied"
        + (f", system prompt {settings['system']!r}" if settings["system"] else ""),
        "- refusal: a refusal phrase in the first 80 characters; broken: empty, mostly "
        "non-text or looping output"
        + (
            f", or word salad (an answer the base finds more surprising than "
            f"{settings['max_surprisal']:.2f} nats per token)"
            if settings.get("max_surprisal")
            else ""
        )
        + " (never counted as compliance)",
        f"- judge: {settings['judge'] or 'none'}"
        + ("; unsafe = the guard's verdict on (request, answer)" if judged else ""),
        "",
        "## Overall",
        "",
    ]
    metrics = [("refusal", "refusal"), ("broken", "broken")]
    if judged:
        metrics.append(("unsafe", "unsafe (judge)"))
    header = "| prompts | metric | " + " | ".join(roles) + " |"
    lines += [header, "|---|---|" + "---|" * len(roles)]
    for kind in ("harmful", "harmless"):
        for key, label in metrics:
            cells = [_pct(summary[r][kind]["overall"].get(key)) for r in roles]
            what = label + (" (over-refusal)" if kind == "harmless" and key == "refusal" else "")
            lines.append(f"| {kind} | {what} | " + " | ".join(cells) + " |")
        if judged:
            cells = [str(summary[r][kind]["overall"]["judge_errors"]) for r in roles]
            lines.append(f"| {kind} | judge errors | " + " | ".join(cells) + " |")
    for kind in ("harmful", "harmless"):
        categories = sorted({c for r in roles for c in summary[r][kind]["categories"]})
        if not categories:
            continue
        lines += ["", f"## {kind.capitalize()} prompts by category", ""]
        cols = [f"{r} {label}" for r in roles for _, label in metrics if _ != "broken"]
        lines += ["| category | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for c in categories:
            n = summary[roles[-1]][kind]["categories"][c]["n"]
            cells = [
                _pct(summary[r][kind]["categories"].get(c, {}).get(key))
                for r in roles
                for key, _ in metrics
                if key != "broken"
            ]
            lines.append(f"| {c} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Samples", ""]
    for kind in ("harmful", "harmless"):
        for role in roles:
            mine = [r for r in records if r.model == role and r.kind == kind]
            by_category: dict[str, list] = {}
            for r in mine:
                by_category.setdefault(r.category or "(none)", []).append(r)
            lines += [f"### {kind}, {role}", ""]
            for c, rs in sorted(by_category.items()):
                for r in rs[:SAMPLES_PER_CATEGORY]:
                    answer = " ".join(r.completion.split())
                    if len(answer) > SAMPLE_CHARS:
                        answer = answer[:SAMPLE_CHARS] + " …"
                    verdict = r.verdict + (f", judge {r.judge}" if r.judge else "")
                    lines.append(f"- **{c}** ({verdict}): {r.prompt}")
                    lines.append(f"  > {answer or '(empty)'}")
            lines.append("")
    lines.append("Every prompt, answer and verdict: `completions.jsonl`.")
    lines.append("")
    return "\n".join(lines)


def safety_png(summary: dict, path: Path, title: str) -> None:
    """Refusal rate (and, with a judge, unsafe rate) per harmful category and for harmless
    prompts, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    roles = list(summary)
    categories = sorted({c for r in roles for c in summary[r]["harmful"]["categories"]})
    groups = [("harmful: all", "harmful", None)]
    groups += [(f"harmful: {c}", "harmful", c) for c in categories]
    groups.append(("harmless: all", "harmless", None))
    keys = ["refusal"]
    if "unsafe" in summary[roles[0]]["harmful"]["overall"]:
        keys.append("unsafe")

    def rate(role, kind, category, key):
        block = summary[role][kind]
        entry = block["overall"] if category is None else block["categories"].get(category, {})
        return entry.get(key) or 0.0

    x = np.arange(len(groups))
    width = 0.8 / len(roles)
    colours = {"base": "#7f7f7f", "model": "#1f77b4"}
    fig, axes = plt.subplots(
        len(keys),
        1,
        figsize=(max(7.0, 0.7 * len(groups) + 3), 3.2 * len(keys) + 1.2),
        squeeze=False,
        sharex=True,
    )
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for i, role in enumerate(roles):
            offset = (i - (len(roles) - 1) / 2) * width
            values = [rate(role, k, c, key) for _, k, c in groups]
            ax.bar(x + offset, values, width, color=colours[role], label=role)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("refusal rate" if key == "refusal" else "unsafe (judge)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes[-1, 0].set_xticks(x, [g[0] for g in groups], rotation=35, ha="right", fontsize=8)
    axes[0, 0].set_title(title if len(title) <= 90 else "..." + title[-87:], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _signed(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


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
        "## Estimates vs real patching (largest estimates)",
        "",
        "*first order*: the gradient at the harmful activations × (harmless mean − harmful "
        f"mean); *integrated*: the gradient averaged at {s['steps']} points of the path on "
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
            f"| {c.name} | {c.first_order:+.3f} | {c.estimate:+.3f} | {_signed(c.patched)} | "
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
    lines += [
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
    suppress = [c for c in comps if c.estimate < 0]
    promote = [c for c in comps if c.estimate > 0]
    lines += [
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
    lines += ["", "Plots: `cumulative.png`, `heads.png`.", ""]
    return "\n".join(lines)


def attribute_pngs(result, folder: Path) -> None:
    """``cumulative.png`` (components patched, strongest first, vs refusal log-odds) and
    ``heads.png`` (layer × head map of the first-order effect, MLPs and embeddings beside)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
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
    fig.savefig(folder / "cumulative.png", dpi=110)
    plt.close(fig)

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


SITES_WHAT = {
    "run time": "r̂ projected out of the activations by hooks, at every layer and position "
    "(residual: the block inputs; attn, mlp: the module outputs; all: the three together, the "
    "paper's directional ablation)",
    "weight edit": "exactly what `orthoedit apply --sites ...` writes (default tied policy), "
    "run through the plan's hooks, its verified run-time equivalent",
}


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


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
        "tokens) with a refusal phrase in the first 80 characters"
        + (f"; unsafe: the verdict of {s['judge']}" if judged else ""),
        "- KL: first-token KL(baseline ‖ condition) on the harmless prompts",
        *(f"- {kind}: {what}" for kind, what in SITES_WHAT.items()),
        "",
        f"**Finding:** {report['finding']}",
        "",
    ]
    head = ["condition", "sites", "log-odds", "Δ vs baseline", "share of full effect", "refusal"]
    head += ["unsafe (judge)"] if judged else []
    head += ["KL"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in conditions:
        cells = [c["kind"], f"{c['name']} ({c['sites']})" if c["kind"] != "baseline" else "–"]
        if c["log_odds"] is None:
            cells += ["n/a"] * (len(head) - 2)
        else:
            cells += [f"{c['log_odds']:.3f}", f"{c['delta']:+.3f}", _share(c["share"])]
            cells.append(_pct(c["refusal"]))
            if judged:
                cells.append(_pct(c["unsafe"]))
            cells.append(f"{c['kl']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [c for c in conditions if c["note"]]
    if notes:
        lines.append("")
        lines += [f"- {c['kind']}: {c['name']}: {c['note']}" for c in notes]
    lines += ["", "Every number, with the settings: `sites.json`.", ""]
    return "\n".join(lines)


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
        if key != "kl" and base[key] is not None:  # the baseline's KL is 0 by definition
            ax.axhline(base[key], color="#333333", ls="--", lw=1.2)
            label += f"\n(dashed: baseline, {fmt.format(base[key])})"
        else:
            label += "\n(the baseline's is 0)"
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks([b[0] for b in bars], [b[1]["name"] for b in bars], fontsize=9)
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


def _profile(params: dict, site: str) -> str:
    """A shape profile in one cell, or a free profile's weights, layer by layer."""
    from .space import free_weights

    free = free_weights(params, site)
    if free is not None:
        return " ".join(f"{w:.2f}" for w in free)
    return (
        f"{params[f'{site}_peak_weight']:.2f} @ L{params[f'{site}_peak_layer']:.1f} "
        f"±{params[f'{site}_width']:.1f} (edge ×{params[f'{site}_edge_frac']:.2f})"
    )


def failure_text(o: dict) -> str:
    """``12.5% (3 refused, 1 broken of 32)`` from a search outcome's dict, with the judge's
    unsafe and unjudged counts when it has them (the search's log lines and its report)."""
    n = o["refused"] + o["complied"] + o["broken"]
    unsafe = "" if o.get("unsafe") is None else f", {o['unsafe']} unsafe"
    if o.get("judge_errors"):
        unsafe += f", {o['judge_errors']} unjudged"
    return f"{o['failure']:.1%} ({o['refused']} refused, {o['broken']} broken{unsafe} of {n})"


def search_markdown(report: dict) -> str:
    """``orthoedit search``: the baselines, the chosen trial and the Pareto front."""
    s = report["settings"]
    chosen = report["chosen"]
    by_number = {t["number"]: t for t in report["trials"]}
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
    drop = "drop" in report["objectives"]
    budget = report.get("budget") or f"KL ≤ {report['max_kl']:g}"
    if drop:
        base = report["judging"].get("eval_base_score")
        lines.append(
            f"- drop: {report['objectives']['drop']}; unedited score {base:.4g}"
            if base is not None
            else f"- drop: {report['objectives']['drop']}"
        )
    lines += [
        (
            f"- budget {budget}: the chosen trial is the lowest KL within it (ties: lower "
            "failure, then the earlier trial)"
            if report.get("max_failure") is not None
            else f"- budget {budget}: the chosen trial is the lowest failure within it "
            "(ties: lower KL, then the earlier trial)"
        ),
        "",
        "| edit | failure (harmful) | KL (harmless) |" + (" drop |" if drop else ""),
        "|---|---|---|" + ("---|" if drop else ""),
    ]

    def tail(o: dict) -> str:
        return f" {o['drop']:.4g} |" if drop else ""

    for name, o in report["baselines"].items():
        what = "measure's selection, every writer" if name == "measure" else "unedited model"
        lines.append(f"| {what} | {failure_text(o)} | {o['kl']:.4f} |{tail(o)}")
    if chosen is None:
        lines.append(f"| chosen | none within {budget} | |" + (" |" if drop else ""))
    else:
        lines.append(
            f"| **chosen: trial {chosen['number']}** | {failure_text(chosen)} | "
            f"{chosen['kl']:.4f} |{tail(chosen)}"
        )
    lines.append("")
    if chosen is not None:
        lines += [
            f"Reproduce it: `{' '.join(['orthoedit', 'apply', *chosen['apply_args']])} --out "
            "edited` (also in `chosen/apply.txt`).",
            "",
        ]
    head = ["trial", "failure", "refused", "broken", "KL", *(["drop"] if drop else [])]
    head += ["direction", "attn", "mlp", "embed"]
    lines += [
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
        lines.append(
            f"| {number}{mark} | {t['failure']:.1%} | {t['refused']} | {t['broken']} | "
            f"{t['kl']:.4f} |{tail(t)} {where}, pos {d['position']} | {_profile(p, 'attn')} | "
            f"{_profile(p, 'mlp')} | {'yes' if p['embed'] else 'no'} |"
        )
    lines += [
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
    return "\n".join(lines)


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
