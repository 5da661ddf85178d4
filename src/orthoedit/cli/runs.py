"""Whole runs and publishing: run (a recipe), demo (the organism's), push (to the Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ..config import PushConfig
from ..pipeline.recipe import STAGES
from . import tables, ui
from .app import app
from .options import command

Stage = Literal[STAGES]


@app.command("run")
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder of the run.")],
    start: Annotated[
        Stage | None, typer.Option("--from", metavar="STAGE", help="Rerun from this stage on.")
    ] = None,
    only: Annotated[
        Stage | None, typer.Option(metavar="STAGE", help="Rerun only this stage.")
    ] = None,
) -> None:
    """Run a recipe's stages in order into one folder, resuming where it stopped.

    The stages (measure or a fixed direction, apply, verify, eval bench, eval safety, export
    gguf, push) write into one folder; stages that are up to date are skipped, so rerunning
    after an interruption resumes. Exit 1 when verify fails or the benchmark
    regresses (nothing is published then)."""
    from ..pipeline.run import run as run_recipe

    with ui.bar() as display:
        # two rows: the run (stage k of n, its elapsed time) and the running stage's step
        run_row = display.add_task("run", total=None)

        def on_stage(k: int, n: int, name: str) -> None:
            display.update(run_row, description=f"run: stage {k}/{n}, {name}", total=n)
            display.update(run_row, completed=k - 1)

        step = ui.stage_bar(display, display.add_task("loading", total=None))
        state = ui.guarded(
            lambda: run_recipe(
                recipe,
                out_dir,
                start=start,
                only=only,
                log=ui.log,
                progress=step,
                on_stage=on_stage,
            ),
            interrupted="interrupted: finished stages are kept; run the same command to resume.",
        )
    ui.out.print(tables.run(out_dir, state))


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder of the run.")] = Path(
        "demo-out"
    ),
) -> None:
    """Run the model organism's recipe end to end, offline, on a CPU (about 30 s).

    The stages are measure, apply, verify, eval bench and eval safety; then it prints what
    changed and where the reports are."""
    from ..pipeline.demo import main

    code = main(str(out_dir))
    if code:
        raise typer.Exit(code)


@command(app, "push", PushConfig, arguments=("model_dir", "repo_id"))
def push(cfg: PushConfig) -> None:
    """Publish an edited checkpoint to the Hugging Face Hub.

    It uploads the weights, config, tokenizer, the
    card (with evaluation results from --eval), the direction under orthoedit/ and the GGUF
    files of export gguf under gguf/ (listed in the card with their types). The token
    comes from HF_TOKEN or `hf auth login`. Exit 1 when the upload breaks off (rerun to
    resume), 2 for bad input."""
    from ..publish import push as run_push

    result = ui.guarded(
        lambda: run_push(cfg, log=ui.log),
        interrupted="interrupted: run the same command again to resume the upload.",
    )
    plan = result.plan
    if cfg.dry_run:
        ui.out.print(tables.upload(plan))
        ui.out.print(f"{len(plan.items)} files, {plan.total:,} bytes. The card (README.md):")
        ui.out.print(plan.card, markup=False, highlight=False, soft_wrap=True)
        return
    for path in result.deleted:
        ui.log(f"deleted stale {path}")
    ui.out.print(
        f"pushed {len(plan.items)} files ({plan.total / 1e9:.2f} GB) to {plan.repo_id} "
        f"@ {plan.revision}: {result.url or ''}",
        markup=False,
    )
