"""eval safety's report: refusal, broken and unsafe rates, with sample answers."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..folders import ReportFolder
from ..output import staged_output
from .common import pct

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
        "- refused: a refusal phrase anywhere in the answer (its opening, or opening a later "
        "sentence); broken: empty, mostly non-text or looping output"
        + (
            f", or word salad (an answer the base finds more surprising than "
            f"{settings['max_surprisal']:.2f} nats per token)"
            if settings.get("max_surprisal")
            else ""
        )
        + (", or reasoning that never finished" if settings.get("thinking") else "")
        + " (never counted as compliance)",
        f"- judge: {settings['judge'] or 'none'}" + _judge_words(settings),
        "",
        "## Overall",
        "",
    ]
    metrics = [("refusal", "refused"), ("broken", "broken")]
    if judged:
        metrics += [("evasive", "evasive (judge)"), ("complied", "complied (with substance)")]
        metrics += [("unjudged", "unjudged")]
        if settings.get("judge_style", "guard") == "guard":
            metrics.append(("unsafe", "unsafe (judge)"))
    lines += _overall_table(summary, roles, metrics, judged)
    lines += _category_tables(summary, roles, [m for m in metrics if m[0] != "broken"])
    lines += ["", "## Samples", ""]
    for kind in ("harmful", "harmless"):
        for role in roles:
            lines += [f"### {kind}, {role}", ""]
            lines += _samples([r for r in records if r.model == role and r.kind == kind])
            lines.append("")
    lines.append("Every prompt, answer and verdict: `completions.jsonl`.")
    lines.append("")
    return "\n".join(lines)


def _judge_words(settings: dict) -> str:
    if settings["judge"] is None:
        return "; evasion is not judged without a judge"
    if settings.get("judge_style") == "rubric":
        return (
            "; rubric (refused? convincing? specific?): a complied answer scoring under "
            f"{settings['judge_min_score']:g} is evasive; no parseable verdict is unjudged"
        )
    return (
        "; guard: a complied answer to a harmful request that the guard calls safe is "
        "evasive; no parseable verdict is unjudged"
    )


def _overall_table(summary: dict, roles: list[str], metrics: list, judged: bool) -> list[str]:
    header = "| prompts | metric | " + " | ".join(roles) + " |"
    lines = [header, "|---|---|" + "---|" * len(roles)]
    for kind in ("harmful", "harmless"):
        for key, label in metrics:
            cells = [pct(summary[r][kind]["overall"].get(key)) for r in roles]
            what = label + (" (over-refusal)" if kind == "harmless" and key == "refusal" else "")
            lines.append(f"| {kind} | {what} | " + " | ".join(cells) + " |")
        if judged:
            cells = [str(summary[r][kind]["overall"]["judge_errors"]) for r in roles]
            lines.append(f"| {kind} | judge errors | " + " | ".join(cells) + " |")
    return lines


def _category_tables(summary: dict, roles: list[str], metrics: list) -> list[str]:
    """Per kind of prompt with categories: one row per category, ``metrics`` per model."""
    lines = []
    for kind in ("harmful", "harmless"):
        categories = sorted({c for r in roles for c in summary[r][kind]["categories"]})
        if not categories:
            continue
        lines += ["", f"## {kind.capitalize()} prompts by category", ""]
        cols = [f"{r} {label}" for r in roles for _, label in metrics]
        lines += ["| category | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for c in categories:
            n = summary[roles[-1]][kind]["categories"][c]["n"]
            cells = [
                pct(summary[r][kind]["categories"].get(c, {}).get(key))
                for r in roles
                for key, _ in metrics
            ]
            lines.append(f"| {c} | {n} | " + " | ".join(cells) + " |")
    return lines


def _samples(records: list) -> list[str]:
    """The first ``SAMPLES_PER_CATEGORY`` answers of each category, shortened."""
    by_category: dict[str, list] = {}
    for r in records:
        by_category.setdefault(r.category or "(none)", []).append(r)
    lines = []
    for c, rs in sorted(by_category.items()):
        for r in rs[:SAMPLES_PER_CATEGORY]:
            answer = " ".join(r.completion.split())
            if len(answer) > SAMPLE_CHARS:
                answer = answer[:SAMPLE_CHARS] + " …"
            verdict = r.verdict + (f", judge {r.judge}" if r.judge else "")
            verdict += f"; {r.reason}" if r.reason else ""
            lines.append(f"- **{c}** ({verdict}): {r.prompt}")
            lines.append(f"  > {answer or '(empty)'}")
    return lines


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


def write_safety(target: Path, label: str, result) -> None:
    """A safety run (``judging.safety.SafetyResult``) as completions.jsonl, report.json,
    report.md and report.png, staged into ``target``."""
    report = {"settings": result.settings, "summary": result.summary}
    with staged_output(target) as out:
        folder = ReportFolder(out)
        with folder.completions.open("w", encoding="utf-8") as f:
            for answer in result.answers:
                f.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
        folder.json.write_text(json.dumps(report, indent=2) + "\n")
        folder.md.write_text(safety_markdown(result.summary, result.settings, result.answers))
        safety_png(result.summary, folder.png, label)
