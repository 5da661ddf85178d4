"""eval bench's report: the regression table and its figure."""

from __future__ import annotations

from pathlib import Path

from .common import num


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
            f"| {r.task} | {metric}{arrow} | {num(r.base)} | {num(r.edited)} | "
            f"{r.delta:+.4f} | {num(r.stderr)} | {'yes' if r.beyond_noise else 'no'} | "
            f"{num(r.threshold, 3)} | {result} |"
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
