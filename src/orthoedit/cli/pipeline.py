"""The pipeline's commands: measure, search, apply, verify."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..config import (
    ApplyConfig,
    ArchitecturesConfig,
    MeasureConfig,
    SearchConfig,
    VerifyConfig,
)
from ..errors import BadInputError
from ..folders import SearchFolder
from . import tables, ui
from .app import app
from .options import Cli, command, items


@command(app, "measure", MeasureConfig)
def measure(cfg: MeasureConfig) -> None:
    """Find the refusal direction and save it as a direction file for apply.

    Difference-of-means candidates are measured at every layer and post-instruction position
    and scored; the chosen one is saved as a direction file for `orthoedit apply`."""
    from ..measure.candidates import measure as run_measure
    from ..measure.select import NoCandidateError

    with ui.progress() as progress:

        def run():
            try:
                return run_measure(cfg, log=ui.log, progress=progress)
            except NoCandidateError as e:  # show why, then fail
                progress.stop()
                ui.out.print(tables.scores(e.selection))
                raise

        result = ui.guarded(run, cfg.out)
    if result.selection is not None:
        ui.out.print(tables.scores(result.selection))
    ui.wrote(
        f"{result.out}: direction at layer {result.layer}, position {result.position} "
        f"(‖harmful − harmless‖ = {result.norm:.4g}; {result.counts['harmful']} harmful, "
        f"{result.counts['harmless']} harmless prompts)"
    )


def _span(text: str | None) -> list[str] | None:
    """``LO:HI`` (or one number) as the two ends pydantic validates."""
    if text is None:
        return None
    ends = text.split(":", 1)
    return ends * 2 if len(ends) == 1 else ends


@command(
    app,
    "search",
    SearchConfig,
    cli={
        "max_failure": Cli(type=str | None),
        "direction_layers": Cli(type=str | None, parse=_span, metavar="LO:HI"),
        "positions": Cli(type=str | None, parse=items, help=" Comma-separated."),
        "backend": Cli(help=" Here: --confirm's answers; the trials run in transformers."),
    },
)
def search(cfg: SearchConfig) -> None:
    """Search the edit against measured refusal and damage (KL).

    The direction's layer and position, per-layer attention and MLP weights and the embedding on
    or off are searched with run-time hooks; it writes the Pareto front and the best edit
    within the KL budget, with the apply command that reproduces it. Resumes the study in
    --out, or with --storage joins a study that several workers share. With --judge, a
    complied answer counts as compliance only when the judge calls it unsafe. With
    --confirm, the chosen edit is then applied and judged against the unedited model on
    held-out prompts (eval safety's judgement)."""
    from ..search import none_chosen
    from ..search import search as run_search

    with ui.progress() as progress:
        result = ui.guarded(
            lambda: run_search(cfg, log=ui.log, progress=progress),
            interrupted="interrupted: run the same command again to resume the search.",
        )
    ui.out.print(tables.front(result))
    folder = SearchFolder(result.out)
    front = (folder.pareto_md, folder.pareto_json, folder.pareto_png)
    ui.wrote(", ".join([str(front[0]), *(p.name for p in front[1:])]))
    if result.chosen is None:
        ui.error(
            none_chosen(result.trials, cfg, result.baselines, result.strong)
            + "; see the front above, loosen the budget or run more --trials."
        )
        raise typer.Exit(1)
    chosen = result.chosen
    command = escape(str(folder.chosen.apply_command))
    ui.out.print(
        f"chosen: trial {chosen.number}, failure {chosen.user_attrs['failure']:.1%}, KL "
        f"{chosen.user_attrs['kl']:.4g}; reproduce it with {command}"
    )
    confirmation = result.confirmation
    if not cfg.confirm or confirmation is None:
        return
    ui.out.print(tables.confirmation(confirmation))
    report = folder.confirm
    written = (report.md, report.json, report.png, report.completions)
    ui.wrote(f"{report.path} ({', '.join(p.name for p in written)})")
    failure = confirmation["failure"]
    said = (
        f"on {confirmation['counts']['harmful']} held-out harmful prompts, trial "
        f"{chosen.number} fails {failure['model']:.1%} against the unedited model's "
        f"{failure['base']:.1%}"
    )
    if not confirmation["confirmed"]:
        ui.error(
            f"not confirmed: {said}; see {report.md}, then search on more "
            "prompts (--harmful) or with a tighter budget.",
            label="FAIL",
        )
        raise typer.Exit(1)
    ui.out.print(f"[green]confirmed[/green]: {said}")


def _sites(text: str) -> list[str]:
    sites = items(text)
    if not sites:
        raise BadInputError("--sites: give at least one of embed, attn, mlp.")
    return sites


@command(
    app,
    "apply",
    ApplyConfig,
    cli={"sites": Cli(type=str, parse=_sites, default="embed,attn,mlp", help=" Comma-separated.")},
)
def apply(cfg: ApplyConfig) -> None:
    """Orthogonalize MODEL's residual-stream writers against a direction.

    Every residual-stream writer of MODEL is projected against a direction (or the span of
    several), in a streaming pass."""
    from ..edit import apply as stage

    prepared = ui.guarded(lambda: stage.prepare(cfg))
    for warning in prepared.plan.warnings:
        ui.warn(warning)
    if cfg.dry_run:
        ui.out.print(tables.plan(prepared.plan))
        if prepared.plan.write_lm_head:
            ui.out.print("untie: lm_head.weight will be written as the original embedding")
        return
    columns = (
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=ui.err, transient=True) as bar:
        task = bar.add_task("editing shards", total=stage.edit_size(prepared))
        target = ui.guarded(
            lambda: stage.execute(prepared, cfg.out, cfg.overwrite, lambda n: bar.advance(task, n)),
            cfg.out,
        )
    ui.wrote(f"{target} ({len(prepared.plan.ops)} tensors edited)")


@command(
    app,
    "verify",
    VerifyConfig,
    arguments=("source", "edited"),
    cli={"dtype": Cli(help=" Tolerances: the looser of the storage dtype's and this one's.")},
)
def verify(cfg: VerifyConfig) -> None:
    """Check an edited checkpoint against the source model with the plan's hooks.

    The source runs with the plan applied by hooks (an edited GGUF: in transformers and in
    llama.cpp where installed); a GGUF exported from an edited folder is checked against that
    folder's model."""
    from ..verify_gguf import is_export

    if ui.guarded(lambda: is_export(cfg)):
        from ..verify_gguf import verify_export as run_verify

        show = tables.verify_export
    else:
        from ..verify import verify as run_verify

        show = tables.verify
    result = ui.guarded(lambda: run_verify(cfg, log=ui.log), cfg.report)
    ui.out.print(show(result, cfg.edited))
    if not result.passed:
        for failure in result.failures:
            ui.error(failure, label="FAIL")
        raise typer.Exit(1)
    ui.out.print("[green]PASS[/green]")


@command(app, "architectures", ArchitecturesConfig)
def architectures(cfg: ArchitecturesConfig) -> None:
    """List the model families orthoedit edits, or check one model's config.json.

    The families are listed with their residual-stream writers and norms, beside the
    architectures it refuses; one model's config.json is checked without its weights."""
    from ..model import catalog

    if cfg.model is None:
        ui.out.print(tables.families(catalog.catalog()))
        return
    found = ui.guarded(lambda: catalog.check_model(cfg.model, cfg.revision))
    ui.out.print(tables.model_check(found))
    how = " (a derived table, proved on a tiny instance of its class)" * (found.status == "derived")
    ui.out.print(
        f"[green]supported[/green]: {escape(cfg.model)} is edited as {escape(found.family)}{how}"
    )
