"""Evaluating an edit: eval bench, eval kl, eval safety, compare."""

from __future__ import annotations

import typer

from ..config import CompareConfig, EvalBenchConfig, EvalKLConfig, EvalSafetyConfig
from ..errors import BadInputError
from . import tables, ui
from .app import app, eval_app
from .options import Cli, command, items


def _thresholds(given: list[str] | None) -> dict[str, float]:
    """``TASK=VALUE`` items as {task: drop}."""
    parsed = {}
    for item in given or []:
        task, _, value = item.partition("=")
        try:
            parsed[task.strip()] = float(value)
        except ValueError:
            task = ""
        if not task.strip():
            raise BadInputError(f"--max-drop-task {item!r}: expected TASK=VALUE, e.g. mmlu=0.03")
    return parsed


@command(
    eval_app,
    "bench",
    EvalBenchConfig,
    arguments=("base", "edited"),
    cli={
        "tasks": Cli(type=str | None, parse=items),
        "max_drop_task": Cli(type=list[str] | None, parse=_thresholds, default=None),
    },
)
def bench(cfg: EvalBenchConfig) -> None:
    """Benchmark regression: lm-eval on BASE and EDITED with identical settings.

    It writes a regression report (report.md, report.json, report.png, lm_eval/). Exit 1 when a
    drop exceeds its threshold."""
    from ..evaluate.bench import eval_bench

    with ui.progress() as progress:
        result = ui.guarded(lambda: eval_bench(cfg, log=ui.log, progress=progress), cfg.out)
    ui.out.print(tables.bench(result))
    ui.wrote(f"{result.out} (report.md, report.json, report.png, lm_eval/)")
    if result.regressions:
        names = ", ".join(f"{r.task} {r.metric}" for r in result.regressions)
        ui.error(f"drop beyond the threshold: {names}", label="FAIL")
        raise typer.Exit(1)


@command(eval_app, "kl", EvalKLConfig, arguments=("base", "edited"))
def kl(cfg: EvalKLConfig) -> None:
    """First-token KL and cross-entropy on harmless prompts, base vs edited.

    They say how much the edit moves what the model says where it should not."""
    from ..evaluate.kl import eval_kl

    report = ui.guarded(lambda: eval_kl(cfg, log=ui.log), cfg.report)
    ui.out.print(tables.kl(report))
    if cfg.report is not None:
        ui.wrote(str(cfg.report))


@command(eval_app, "safety", EvalSafetyConfig)
def safety(cfg: EvalSafetyConfig) -> None:
    """Judge MODEL's (and BASE's) answers to harmful and harmless prompts.

    Every answer is judged (refusal phrases, degenerate output, a guard model); it writes a
    report and every answer."""
    from ..evaluate.safety import eval_safety

    with ui.progress() as progress:
        result = ui.guarded(lambda: eval_safety(cfg, log=ui.log, progress=progress), cfg.out)
    ui.out.print(tables.safety(result, judged=bool(cfg.judge)))
    ui.wrote(f"{result.out} (report.md, report.json, report.png, completions.jsonl)")


@command(app, "compare", CompareConfig, arguments=("base", "edited"))
def compare(cfg: CompareConfig) -> None:
    """Both models' answers to the same prompts, side by side.

    In the terminal and as Markdown: the first thing to look at before publishing an edit."""
    from ..evaluate.compare import compare as run_compare

    pairs = ui.guarded(lambda: run_compare(cfg, log=ui.log), cfg.report)
    ui.out.print(tables.compare(pairs))
    ui.wrote(str(cfg.report))
