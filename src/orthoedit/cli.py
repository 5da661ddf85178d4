"""The ``orthoedit`` command line: parse, call one library function, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from . import __version__
from .architectures import Site, TiedPolicy
from .config import ApplyConfig, MeasureConfig, VerifyConfig
from .errors import OrthoeditError

app = typer.Typer(
    name="orthoedit",
    help="Find a chat model's refusal direction and orthogonalize its weights against it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _help(model: type[BaseModel], name: str) -> str:
    """CLI help comes from the config model's field descriptions (one source of truth)."""
    return escape(model.model_fields[name].description or "")


def _run(fn):
    """Run a library call; user errors become one red line and their exit code."""
    try:
        return fn()
    except OrthoeditError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        err.print(f"[red]error:[/red] {escape(where)}: {escape(first['msg'])}", highlight=False)
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        out.print(f"orthoedit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """orthoedit: measure, edit, verify, evaluate and publish refusal-direction edits."""


def _plan_table(plan) -> Table:
    table = Table(title=f"plan: {len(plan.ops)} tensors ({plan.family}, d_model {plan.d_model})")
    for col in ("tensor", "site", "layer", "axis", "scale", "vector"):
        table.add_column(col, overflow="fold")  # full names: the plan must stay greppable
    for op in plan.ops:
        layer = "-" if op.layer is None else str(op.layer)
        table.add_row(op.tensor, op.site, layer, str(op.axis), f"{op.scale:g}", op.vector_label)
    return table


@app.command()
def apply(
    model: Annotated[str, typer.Argument(help=_help(ApplyConfig, "model"))],
    direction: Annotated[Path, typer.Option(help=_help(ApplyConfig, "direction"))],
    out_dir: Annotated[Path | None, typer.Option("--out", help=_help(ApplyConfig, "out"))] = None,
    direction_layer: Annotated[
        int | None, typer.Option(help=_help(ApplyConfig, "direction_layer"))
    ] = None,
    revision: Annotated[str | None, typer.Option(help=_help(ApplyConfig, "revision"))] = None,
    base_model: Annotated[str | None, typer.Option(help=_help(ApplyConfig, "base_model"))] = None,
    sites: Annotated[
        str, typer.Option(help=_help(ApplyConfig, "sites") + " Comma-separated.")
    ] = "embed,attn,mlp",
    layers: Annotated[str | None, typer.Option(help=_help(ApplyConfig, "layers"))] = None,
    scales: Annotated[Path | None, typer.Option(help=_help(ApplyConfig, "scales"))] = None,
    tied: Annotated[TiedPolicy | None, typer.Option(help=_help(ApplyConfig, "tied"))] = None,
    overwrite: Annotated[bool, typer.Option(help=_help(ApplyConfig, "overwrite"))] = False,
    dry_run: Annotated[bool, typer.Option(help=_help(ApplyConfig, "dry_run"))] = False,
) -> None:
    """Orthogonalize every residual-stream writer of MODEL against a direction."""
    from . import apply as stage

    if out_dir is None and not dry_run:
        err.print("[red]error:[/red] --out is required (or use --dry-run).")
        raise typer.Exit(2)
    site_list: list[Site] = [s.strip() for s in sites.split(",") if s.strip()]  # type: ignore[misc]
    cfg = _run(
        lambda: ApplyConfig(
            model=model,
            direction=direction,
            out=out_dir or Path("."),
            direction_layer=direction_layer,
            revision=revision,
            base_model=base_model,
            sites=site_list,
            layers=layers,
            scales=scales,
            tied=tied,
            overwrite=overwrite,
            dry_run=dry_run,
        )
    )
    prepared = _run(lambda: stage.prepare(cfg))
    for warning in prepared.plan.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
    if dry_run:
        out.print(_plan_table(prepared.plan))
        if prepared.plan.write_lm_head:
            out.print("untie: lm_head.weight will be written as the original embedding")
        return
    columns = (
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("editing shards", total=stage.edit_size(prepared))
        target = _run(
            lambda: stage.execute(prepared, cfg.out, cfg.overwrite, lambda n: bar.advance(task, n))
        )
    out.print(f"wrote {escape(str(target))} ({len(prepared.plan.ops)} tensors edited)")


@app.command()
def verify(
    source: Annotated[str, typer.Argument(help=_help(VerifyConfig, "source"))],
    edited: Annotated[Path, typer.Argument(help=_help(VerifyConfig, "edited"))],
    revision: Annotated[str | None, typer.Option(help=_help(VerifyConfig, "revision"))] = None,
    prompts: Annotated[Path | None, typer.Option(help=_help(VerifyConfig, "prompts"))] = None,
    max_prompts: Annotated[int, typer.Option(help=_help(VerifyConfig, "max_prompts"))] = 8,
    report: Annotated[Path | None, typer.Option(help=_help(VerifyConfig, "report"))] = None,
) -> None:
    """Check an edited checkpoint against the source model with the plan applied by hooks."""
    from .verify import verify as run_verify

    cfg = _run(
        lambda: VerifyConfig(
            source=source,
            edited=edited,
            revision=revision,
            prompts=prompts,
            max_prompts=max_prompts,
            report=report,
        )
    )
    result = _run(lambda: run_verify(cfg, log=lambda m: err.print(f"[dim]{escape(m)}[/dim]")))
    table = Table(title=f"verify {escape(str(edited))} ({result.storage_dtype})")
    table.add_column("check")
    table.add_column("value", justify="right")
    rows = [
        ("max |Δlogit| vs plan hooks", f"{result.max_logit_diff:.3g}"),
        ("mean KL vs plan hooks", f"{result.mean_kl:.3g}"),
        ("max ‖uᵀW‖/‖W‖ (edited tensors)", f"{result.max_weight_residual:.3g}"),
        (
            "residual leak max |r̂ᵀx|/‖x‖",
            f"{result.residual_leak:.3g}" + ("" if result.leak_checked else " (partial plan)"),
        ),
        ("unedited tensors byte-identical", str(result.unedited_identical)),
        ("shard headers identical", str(result.headers_identical)),
    ]
    if result.paper_ablation_max_logit_diff is not None:
        rows.append(
            ("max |Δlogit| vs residual ablation", f"{result.paper_ablation_max_logit_diff:.3g}")
        )
    if result.contribution_kl is not None:
        rows.append(("KL vs contribution projection (post-norm)", f"{result.contribution_kl:.3g}"))
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if report:
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if not result.passed:
        for failure in result.failures:
            err.print(f"[red]FAIL:[/red] {escape(failure)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print("[green]PASS[/green]")


def _scores_table(selection) -> Table:
    """The fully scored candidates; the others (pruned, too deep) are counted in the caption."""
    chosen = selection.chosen
    table = Table(title="scored candidates (refusal log-odds; lower bypass is better)")
    for name in ("layer", "position", "bypass", "induce", "KL", "kept"):
        table.add_column(name, justify="right" if name != "kept" else "left")
    scored = [s for s in selection.scores if s.bypass == s.bypass]  # not NaN
    for s in scored:
        mark = (
            "[bold green]chosen[/]"
            if chosen
            and (s.layer, s.position)
            == (
                chosen.layer,
                chosen.position,
            )
            else ""
        )
        kept = mark or ("yes" if s.kept else escape("; ".join(s.why)))
        table.add_row(
            str(s.layer), str(s.position), f"{s.bypass:.2f}", f"{s.induce:.2f}", f"{s.kl:.3g}", kept
        )
    base = selection.baseline
    table.caption = (
        f"without intervention: harmful {base['harmful_log_odds']:.2f}, "
        f"harmless {base['harmless_log_odds']:.2f}; "
        f"{len(selection.scores) - len(scored)} more candidates not fully scored "
        "(pruned, too deep or no difference: see scores.json)"
    )
    return table


@app.command()
def measure(
    model: Annotated[str, typer.Argument(help=_help(MeasureConfig, "model"))],
    out_dir: Annotated[Path, typer.Option("--out", help=_help(MeasureConfig, "out"))],
    harmful: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "harmful"))] = None,
    harmless: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "harmless"))] = None,
    layer: Annotated[int | None, typer.Option(help=_help(MeasureConfig, "layer"))] = None,
    position: Annotated[int | None, typer.Option(help=_help(MeasureConfig, "position"))] = None,
    column: Annotated[str, typer.Option(help=_help(MeasureConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(MeasureConfig, "split"))] = "train",
    n_train: Annotated[int, typer.Option(help=_help(MeasureConfig, "n_train"))] = 128,
    n_val: Annotated[int, typer.Option(help=_help(MeasureConfig, "n_val"))] = 32,
    seed: Annotated[int, typer.Option(help=_help(MeasureConfig, "seed"))] = 0,
    filter_: Annotated[
        bool, typer.Option("--filter/--no-filter", help=_help(MeasureConfig, "filter"))
    ] = True,
    max_kl: Annotated[float, typer.Option(help=_help(MeasureConfig, "max_kl"))] = 0.1,
    max_layer_frac: Annotated[
        float, typer.Option(help=_help(MeasureConfig, "max_layer_frac"))
    ] = 0.8,
    top_k: Annotated[int, typer.Option(help=_help(MeasureConfig, "top_k"))] = 20,
    thorough: Annotated[bool, typer.Option(help=_help(MeasureConfig, "thorough"))] = False,
    refusal_tokens: Annotated[
        str | None, typer.Option(help=_help(MeasureConfig, "refusal_tokens"))
    ] = None,
    system: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "system"))] = None,
    template: Annotated[Path | None, typer.Option(help=_help(MeasureConfig, "template"))] = None,
    revision: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "revision"))] = None,
    dtype: Annotated[str, typer.Option(help=_help(MeasureConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(MeasureConfig, "batch_size"))] = 16,
    overwrite: Annotated[bool, typer.Option(help=_help(MeasureConfig, "overwrite"))] = False,
) -> None:
    """Measure difference-of-means candidates at every layer and post-instruction position,
    and save the chosen one as a direction file for `orthoedit apply`."""
    from .measure import Progress as MeasureProgress
    from .measure import measure as run_measure
    from .select import NoCandidateError

    cfg = _run(
        lambda: MeasureConfig(
            model=model,
            out=out_dir,
            harmful=harmful,
            harmless=harmless,
            layer=layer,
            position=position,
            column=column,
            split=split,
            n_train=n_train,
            n_val=n_val,
            seed=seed,
            filter=filter_,
            max_kl=max_kl,
            max_layer_frac=max_layer_frac,
            top_k=top_k,
            thorough=thorough,
            refusal_tokens=refusal_tokens,
            system=system,
            template=template,
            revision=revision,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    )
    with Progress(*Progress.get_default_columns(), console=err, transient=True) as bar:
        task = bar.add_task("loading", total=None)

        class Bar(MeasureProgress):
            def start(self, name: str, total: int | None) -> None:
                bar.update(task, description=name, total=total, completed=0)

            def advance(self, n: int = 1) -> None:
                bar.advance(task, n)

        def run():
            try:
                return run_measure(
                    cfg,
                    log=lambda m: err.print(f"[dim]{escape(m)}[/dim]"),
                    progress=Bar(),
                )
            except NoCandidateError as e:  # show why, then fail
                bar.stop()
                out.print(_scores_table(e.selection))
                raise

        result = _run(run)
    if result.selection is not None:
        out.print(_scores_table(result.selection))
    out.print(
        f"wrote {escape(str(result.out))}: direction at layer {result.layer}, position "
        f"{result.position} (‖harmful − harmless‖ = {result.norm:.4g}; "
        f"{result.counts['harmful']} harmful, {result.counts['harmless']} harmless prompts)"
    )


if __name__ == "__main__":
    app()
