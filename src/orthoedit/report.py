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
        "non-text or looping output (never counted as compliance)",
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
