"""The ``orthoedit`` command line: parse, call one library function, print."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import BaseModel, ValidationError
from rich import filesize
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .architectures import Site, TiedPolicy
from .config import (
    ApplyConfig,
    AttributeConfig,
    Backend,
    CompareConfig,
    DType,
    EditMethod,
    EvalBenchConfig,
    EvalKLConfig,
    EvalSafetyConfig,
    MeasureConfig,
    PushConfig,
    PushMethod,
    SearchConfig,
    StudySitesConfig,
    VerifyConfig,
)
from .errors import OrthoeditError, Terminated
from .helptext import Group
from .recipe import STAGES

Stage = Literal[STAGES]

app = typer.Typer(
    cls=Group,
    name="orthoedit",
    help="Find a chat model's refusal direction and orthogonalize its weights against it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
eval_app = typer.Typer(
    cls=Group,
    help="Evaluate an edit: benchmark regression (lm-eval), safety (refusals, guard-model "
    "verdicts) and damage metrics.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


def console(stderr: bool = False, width: int | None = None) -> Console:
    """orthoedit's consoles: prose is left to the terminal to wrap (soft wrap), so a long line,
    such as a command to copy, is never broken mid-sentence; tables fit the width."""
    return Console(stderr=stderr, width=width, soft_wrap=True)


out = console()
err = console(stderr=True)


def _help(model: type[BaseModel], name: str) -> str:
    """CLI help comes from the config model's field descriptions (one source of truth)."""
    return escape(model.model_fields[name].description or "")


# The safety judge's options, one declaration for eval safety, search and study sites.
JudgeOpt = Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "judge"))]
JudgeModelOpt = Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "judge_model"))]
JudgeKeyEnvOpt = Annotated[str, typer.Option(help=_help(EvalSafetyConfig, "judge_api_key_env"))]
JudgeTimeoutOpt = Annotated[float, typer.Option(help=_help(EvalSafetyConfig, "judge_timeout"))]
JudgeRetriesOpt = Annotated[int, typer.Option(help=_help(EvalSafetyConfig, "judge_retries"))]


def _log(message: str) -> None:
    """A progress line of the library's, dim, wrapped by the terminal (not at 80 columns)."""
    err.print(f"[dim]{escape(message)}[/dim]", soft_wrap=True, highlight=False)


def _run(fn, target: Path | None = None, interrupted: str | None = None):
    """Run a library call; user errors become one red line and their exit code. An interrupt
    (Ctrl-C, or SIGTERM through ``entry``) says what became of the output: ``interrupted``,
    or that nothing was written to ``target``."""
    try:
        return fn()
    except KeyboardInterrupt as e:
        where = f" to {target}" if target is not None else ""
        err.print(interrupted or f"interrupted; nothing was written{where}.", soft_wrap=True)
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    except OrthoeditError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except ValidationError as e:
        err.print(f"[red]error:[/red] {escape(option_error(e))}", highlight=False)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except Exception as e:  # not foreseen: a bug, reported in one line with its traceback
        _bug(e)


def _bug(e: Exception) -> None:
    """An exception orthoedit did not foresee: one line naming it and the log file that holds
    the traceback, exit 1 (bad input is checked before anything runs and exits 2)."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="orthoedit-error-", suffix=".log")
    with open(fd, "w") as log:
        log.write(f"orthoedit {__version__}\n")
        log.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    first = (str(e).strip().splitlines() or [""])[0][:200]
    err.print(
        f"[red]error:[/red] unexpected {type(e).__name__}: {escape(first)}. This is a bug in "
        f"orthoedit; the traceback is in {escape(path)} (please attach it to a report).",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1) from None


def option_error(e: ValidationError) -> str:
    """A config's validation error in the CLI's words: ``--n-train must be >= 2``, naming the
    option (a list's item too: ``--sites``), not the pydantic field."""
    first = e.errors()[0]
    option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "input"
    msg = first["msg"].removeprefix("Value error, ")
    if msg.startswith(option):
        return msg
    ctx = first.get("ctx") or {}
    words = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    for kind, sign in words.items():
        if first["type"] == kind:
            bound = next(iter(ctx.values()), "")
            return f"{option} must be {sign} {bound}"
    given = f" {first['input']!r}" if first["type"] == "literal_error" else ""
    return f"{option}{given}: {msg.replace('Input should be', 'must be')}"


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
    k = len(plan.directions) + len(plan.per_layer_directions)
    span = "" if plan.single else f", span of {k} directions" + (" per layer" * (not plan.shared))
    title = f"plan: {len(plan.ops)} tensors ({plan.family}, d_model {plan.d_model}{span})"
    table = Table(title=title)
    for col in ("tensor", "site", "layer", "axis", "scale", "vector"):
        table.add_column(col, overflow="fold")  # full names: the plan must stay greppable
    for op in plan.ops:
        layer = "-" if op.layer is None else str(op.layer)
        label = op.vector_label if plan.single else op.vector_label.replace("r", "U", 1)
        table.add_row(op.tensor, op.site, layer, str(op.axis), f"{op.scale:g}", label)
    return table


@app.command()
def apply(
    model: Annotated[str, typer.Argument(help=_help(ApplyConfig, "model"))],
    direction: Annotated[list[Path], typer.Option(help=_help(ApplyConfig, "direction"))],
    out_dir: Annotated[Path | None, typer.Option("--out", help=_help(ApplyConfig, "out"))] = None,
    direction_layer: Annotated[
        int | None, typer.Option(help=_help(ApplyConfig, "direction_layer"))
    ] = None,
    per_layer: Annotated[bool, typer.Option(help=_help(ApplyConfig, "per_layer"))] = False,
    revision: Annotated[str | None, typer.Option(help=_help(ApplyConfig, "revision"))] = None,
    base_model: Annotated[str | None, typer.Option(help=_help(ApplyConfig, "base_model"))] = None,
    sites: Annotated[
        str, typer.Option(help=_help(ApplyConfig, "sites") + " Comma-separated.")
    ] = "embed,attn,mlp",
    layers: Annotated[str | None, typer.Option(help=_help(ApplyConfig, "layers"))] = None,
    scales: Annotated[Path | None, typer.Option(help=_help(ApplyConfig, "scales"))] = None,
    tied: Annotated[TiedPolicy | None, typer.Option(help=_help(ApplyConfig, "tied"))] = None,
    method: Annotated[EditMethod, typer.Option(help=_help(ApplyConfig, "method"))] = "project",
    harmless_mean: Annotated[
        Path | None, typer.Option(help=_help(ApplyConfig, "harmless_mean"))
    ] = None,
    overwrite: Annotated[bool, typer.Option(help=_help(ApplyConfig, "overwrite"))] = False,
    dry_run: Annotated[bool, typer.Option(help=_help(ApplyConfig, "dry_run"))] = False,
) -> None:
    """Orthogonalize every residual-stream writer of MODEL against a direction (or the span of
    several)."""
    from . import apply as stage

    if out_dir is None and not dry_run:
        err.print("[red]error:[/red] --out is required (or use --dry-run).")
        raise typer.Exit(2)
    site_list: list[Site] = [s.strip() for s in sites.split(",") if s.strip()]  # type: ignore[misc]
    if not site_list:
        err.print("[red]error:[/red] --sites: give at least one of embed, attn, mlp.")
        raise typer.Exit(2)
    cfg = _run(
        lambda: ApplyConfig(
            model=model,
            direction=direction,
            out=out_dir or Path("."),
            direction_layer=direction_layer,
            per_layer=per_layer,
            revision=revision,
            base_model=base_model,
            sites=site_list,
            layers=layers,
            scales=scales,
            tied=tied,
            method=method,
            harmless_mean=harmless_mean,
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
            lambda: stage.execute(prepared, cfg.out, cfg.overwrite, lambda n: bar.advance(task, n)),
            cfg.out,
        )
    out.print(f"wrote {escape(str(target))} ({len(prepared.plan.ops)} tensors edited)")


@app.command()
def verify(
    source: Annotated[str, typer.Argument(help=_help(VerifyConfig, "source"))],
    edited: Annotated[Path, typer.Argument(help=_help(VerifyConfig, "edited"))],
    revision: Annotated[str | None, typer.Option(help=_help(VerifyConfig, "revision"))] = None,
    prompts: Annotated[str | None, typer.Option(help=_help(VerifyConfig, "prompts"))] = None,
    column: Annotated[str, typer.Option(help=_help(VerifyConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(VerifyConfig, "split"))] = "train",
    max_prompts: Annotated[int, typer.Option(help=_help(VerifyConfig, "max_prompts"))] = 8,
    report: Annotated[Path | None, typer.Option(help=_help(VerifyConfig, "report"))] = None,
    overwrite: Annotated[bool, typer.Option(help=_help(VerifyConfig, "overwrite"))] = False,
) -> None:
    """Check an edited checkpoint against the source model with the plan applied by hooks."""
    from .verify import verify as run_verify

    cfg = _run(
        lambda: VerifyConfig(
            source=source,
            edited=edited,
            revision=revision,
            prompts=prompts,
            column=column,
            split=split,
            max_prompts=max_prompts,
            report=report,
            overwrite=overwrite,
        )
    )
    result = _run(lambda: run_verify(cfg, log=_log), cfg.report)
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
    if result.max_norm_change is not None:
        rows.append(("max change of a written vector's length", f"{result.max_norm_change:.3g}"))
    if result.method == "norm-preserving":
        table.caption = (
            "method norm-preserving: not equal to run-time ablation by design, so the logits "
            "and KL against the hooks are reported, not judged"
        )
    for row in rows:
        table.add_row(*row)
    out.print(table)
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
    dtype: Annotated[DType, typer.Option(help=_help(MeasureConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "device"))] = None,
    max_memory: Annotated[str | None, typer.Option(help=_help(MeasureConfig, "max_memory"))] = None,
    offload_folder: Annotated[
        Path | None, typer.Option(help=_help(MeasureConfig, "offload_folder"))
    ] = None,
    batch_size: Annotated[int, typer.Option(help=_help(MeasureConfig, "batch_size"))] = 32,
    overwrite: Annotated[bool, typer.Option(help=_help(MeasureConfig, "overwrite"))] = False,
) -> None:
    """Measure difference-of-means candidates at every layer and post-instruction position,
    and save the chosen one as a direction file for `orthoedit apply`."""
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
            max_memory=max_memory,
            offload_folder=offload_folder,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    )
    with _progress() as progress:

        def run():
            try:
                return run_measure(
                    cfg,
                    log=_log,
                    progress=progress,
                )
            except NoCandidateError as e:  # show why, then fail
                progress.stop()
                out.print(_scores_table(e.selection))
                raise

        result = _run(run, cfg.out)
    if result.selection is not None:
        out.print(_scores_table(result.selection))
    out.print(
        f"wrote {escape(str(result.out))}: direction at layer {result.layer}, position "
        f"{result.position} (‖harmful − harmless‖ = {result.norm:.4g}; "
        f"{result.counts['harmful']} harmful, {result.counts['harmless']} harmless prompts)"
    )


def _thresholds(items: list[str]) -> dict[str, float]:
    parsed = {}
    for item in items:
        task, _, value = item.partition("=")
        try:
            parsed[task.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: expected TASK=VALUE, e.g. mmlu=0.03") from None
        if not task.strip():
            raise typer.BadParameter(f"{item!r}: expected TASK=VALUE, e.g. mmlu=0.03")
    return parsed


def _bench_table(result) -> Table:
    table = Table(
        title="benchmark regression (edited − base)",
        caption="* beyond noise: |delta| > 2 × stderr (the two runs combined)",
    )
    for name in ("task", "metric", "base", "edited", "delta", "± stderr", "result"):
        left = name in ("task", "metric", "result")
        table.add_column(name, justify="left" if left else "right", overflow="fold")
    for r in result.rows:
        metric = r.metric if r.filter == "none" else f"{r.metric} ({r.filter})"
        verdict = (
            "[red]REGRESSION[/]" if r.regressed else ("ok" if r.threshold is not None else "–")
        )
        table.add_row(
            r.task,
            escape(metric),
            f"{r.base:.4f}",
            f"{r.edited:.4f}",
            f"{r.delta:+.4f}" + (" *" if r.beyond_noise else ""),
            "–" if r.stderr is None else f"{r.stderr:.4f}",
            verdict,
        )
    return table


@eval_app.command("bench")
def eval_bench(
    base: Annotated[str, typer.Argument(help=_help(EvalBenchConfig, "base"))],
    edited: Annotated[str, typer.Argument(help=_help(EvalBenchConfig, "edited"))],
    out_dir: Annotated[Path, typer.Option("--out", help=_help(EvalBenchConfig, "out"))],
    tasks: Annotated[str | None, typer.Option(help=_help(EvalBenchConfig, "tasks"))] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help=_help(EvalBenchConfig, "num_fewshot"))
    ] = None,
    limit: Annotated[float | None, typer.Option(help=_help(EvalBenchConfig, "limit"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(EvalBenchConfig, "batch_size"))] = 16,
    seed: Annotated[int, typer.Option(help=_help(EvalBenchConfig, "seed"))] = 0,
    chat_template: Annotated[
        bool | None,
        typer.Option(
            "--chat-template/--no-chat-template", help=_help(EvalBenchConfig, "chat_template")
        ),
    ] = None,
    max_drop: Annotated[float, typer.Option(help=_help(EvalBenchConfig, "max_drop"))] = 0.02,
    max_drop_task: Annotated[
        list[str] | None, typer.Option(help=_help(EvalBenchConfig, "max_drop_task"))
    ] = None,
    backend: Annotated[Backend, typer.Option(help=_help(EvalBenchConfig, "backend"))] = "hf",
    dtype: Annotated[str, typer.Option(help=_help(EvalBenchConfig, "dtype"))] = "auto",
    device: Annotated[str | None, typer.Option(help=_help(EvalBenchConfig, "device"))] = None,
    tensor_parallel_size: Annotated[
        int, typer.Option(help=_help(EvalBenchConfig, "tensor_parallel_size"))
    ] = 1,
    data_parallel_size: Annotated[
        int, typer.Option(help=_help(EvalBenchConfig, "data_parallel_size"))
    ] = 1,
    offline: Annotated[bool, typer.Option(help=_help(EvalBenchConfig, "offline"))] = False,
    overwrite: Annotated[bool, typer.Option(help=_help(EvalBenchConfig, "overwrite"))] = False,
) -> None:
    """Run lm-eval on BASE and EDITED with identical settings and write a regression report
    (report.md, report.json, report.png, lm_eval/). Exit 1 when a drop exceeds its threshold."""
    from .evalbench import eval_bench as run_bench

    cfg = _run(
        lambda: EvalBenchConfig(
            base=base,
            edited=edited,
            out=out_dir,
            tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            chat_template=chat_template,
            max_drop=max_drop,
            max_drop_task=_thresholds(max_drop_task or []),
            backend=backend,
            dtype=dtype,
            device=device,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            offline=offline,
            overwrite=overwrite,
        )
    )
    with _progress() as progress:
        result = _run(lambda: run_bench(cfg, log=_log, progress=progress), cfg.out)
    out.print(_bench_table(result))
    out.print(f"wrote {escape(str(result.out))} (report.md, report.json, report.png, lm_eval/)")
    if result.regressions:
        names = ", ".join(f"{r.task} {r.metric}" for r in result.regressions)
        err.print(f"[red]FAIL:[/red] drop beyond the threshold: {escape(names)}", highlight=False)
        raise typer.Exit(1)


@eval_app.command("kl")
def eval_kl(
    base: Annotated[str, typer.Argument(help=_help(EvalKLConfig, "base"))],
    edited: Annotated[str, typer.Argument(help=_help(EvalKLConfig, "edited"))],
    prompts: Annotated[str | None, typer.Option(help=_help(EvalKLConfig, "prompts"))] = None,
    column: Annotated[str, typer.Option(help=_help(EvalKLConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(EvalKLConfig, "split"))] = "train",
    n: Annotated[int, typer.Option("--n", help=_help(EvalKLConfig, "n"))] = 64,
    seed: Annotated[int, typer.Option(help=_help(EvalKLConfig, "seed"))] = 0,
    max_new_tokens: Annotated[int, typer.Option(help=_help(EvalKLConfig, "max_new_tokens"))] = 32,
    system: Annotated[str | None, typer.Option(help=_help(EvalKLConfig, "system"))] = None,
    dtype: Annotated[DType, typer.Option(help=_help(EvalKLConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(EvalKLConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(EvalKLConfig, "batch_size"))] = 32,
    report: Annotated[Path | None, typer.Option(help=_help(EvalKLConfig, "report"))] = None,
    overwrite: Annotated[bool, typer.Option(help=_help(EvalKLConfig, "overwrite"))] = False,
) -> None:
    """First-token KL and cross-entropy on harmless prompts, base vs edited: how much the edit
    moves what the model says where it should not."""
    from .damage import eval_kl as run_kl

    cfg = _run(
        lambda: EvalKLConfig(
            base=base,
            edited=edited,
            prompts=prompts,
            column=column,
            split=split,
            n=n,
            seed=seed,
            max_new_tokens=max_new_tokens,
            system=system,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            report=report,
            overwrite=overwrite,
        )
    )
    report = _run(lambda: run_kl(cfg, log=_log), cfg.report)
    table = Table(title=f"damage on {report.prompts} harmless prompts")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("edited", justify="right")
    table.add_column("change", justify="right")
    table.add_row("first-token KL (base ‖ edited)", "", "", f"{report.first_token_kl:.4g}")
    table.add_row(
        f"cross-entropy on base answers ({report.answer_tokens} tokens), nats/token",
        f"{report.cross_entropy_base:.4f}",
        f"{report.cross_entropy_edited:.4f}",
        f"{report.cross_entropy_delta:+.4f}",
    )
    out.print(table)
    if cfg.report is not None:
        out.print(f"wrote {escape(str(cfg.report))}")


def _stage_bar(bar, task):
    """A ``progress.Progress`` that drives one row (``task``) of a rich Progress display."""
    from .progress import Progress as StageProgress

    class Bar(StageProgress):
        def __init__(self):
            self.task = task

        def start(self, name: str, total: int | None) -> None:
            # a new step is a new row: its count and elapsed time start from zero
            bar.remove_task(self.task)
            self.task = bar.add_task(escape(name), total=total)

        def advance(self, n: int = 1) -> None:
            bar.advance(self.task, n)

        def stop(self) -> None:
            bar.stop()

    return Bar()


class _Count(ProgressColumn):
    """``12/64``; bytes (``1.2/3.4 GB``) for a step counted in bytes (a million or more)."""

    def render(self, task) -> Text:
        if task.total is None:
            return Text("")
        done, total = int(task.completed), int(task.total)
        if total >= 1_000_000:
            return Text(f"{filesize.decimal(done)}/{filesize.decimal(total)}", style="green")
        return Text(f"{done}/{total}", style="green")


def _columns() -> tuple:
    """Step name, bar, percentage, count, elapsed time."""
    return (*Progress.get_default_columns()[:-1], _Count(), TimeElapsedColumn())


@contextlib.contextmanager
def _progress():
    """A command's one progress display, on stderr and gone when it ends: the current step's
    name, bar, count and elapsed time (a library's own bars drive it too, see progress.py)."""
    with Progress(*_columns(), console=err, transient=True) as bar:
        yield _stage_bar(bar, bar.add_task("loading", total=None))


@eval_app.command("safety")
def eval_safety(
    model: Annotated[str, typer.Argument(help=_help(EvalSafetyConfig, "model"))],
    out_dir: Annotated[Path, typer.Option("--out", help=_help(EvalSafetyConfig, "out"))],
    base: Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "base"))] = None,
    harmful: Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "harmful"))] = None,
    harmless: Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "harmless"))] = None,
    column: Annotated[str, typer.Option(help=_help(EvalSafetyConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(EvalSafetyConfig, "split"))] = "train",
    n: Annotated[int | None, typer.Option("--n", help=_help(EvalSafetyConfig, "n"))] = None,
    seed: Annotated[int, typer.Option(help=_help(EvalSafetyConfig, "seed"))] = 0,
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_api_key_env: JudgeKeyEnvOpt = "OPENAI_API_KEY",
    judge_timeout: JudgeTimeoutOpt = 60.0,
    judge_retries: JudgeRetriesOpt = 2,
    max_new_tokens: Annotated[
        int, typer.Option(help=_help(EvalSafetyConfig, "max_new_tokens"))
    ] = 256,
    phrases: Annotated[Path | None, typer.Option(help=_help(EvalSafetyConfig, "phrases"))] = None,
    max_surprisal: Annotated[
        float | None, typer.Option(help=_help(EvalSafetyConfig, "max_surprisal"))
    ] = None,
    system: Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "system"))] = None,
    template: Annotated[Path | None, typer.Option(help=_help(EvalSafetyConfig, "template"))] = None,
    dtype: Annotated[DType, typer.Option(help=_help(EvalSafetyConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(EvalSafetyConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(EvalSafetyConfig, "batch_size"))] = 32,
    overwrite: Annotated[bool, typer.Option(help=_help(EvalSafetyConfig, "overwrite"))] = False,
) -> None:
    """Answer harmful and harmless prompts with MODEL (and BASE), judge every answer (refusal
    phrases, degenerate output, a guard model) and write a report and every answer."""
    from .safety import eval_safety as run_safety

    cfg = _run(
        lambda: EvalSafetyConfig(
            model=model,
            out=out_dir,
            base=base,
            harmful=harmful,
            harmless=harmless,
            column=column,
            split=split,
            n=n,
            seed=seed,
            judge=judge,
            judge_model=judge_model,
            judge_api_key_env=judge_api_key_env,
            judge_timeout=judge_timeout,
            judge_retries=judge_retries,
            max_new_tokens=max_new_tokens,
            phrases=phrases,
            max_surprisal=max_surprisal,
            system=system,
            template=template,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    )
    with _progress() as progress:
        result = _run(
            lambda: run_safety(
                cfg,
                log=_log,
                progress=progress,
            ),
            cfg.out,
        )
    table = Table(title="safety (share of answers)")
    table.add_column("prompts")
    table.add_column("metric")
    roles = list(result.summary)
    for role in roles:
        table.add_column(role, justify="right")
    keys = ["refusal", "broken"] + (["unsafe", "judge_errors"] if cfg.judge else [])
    for kind in ("harmful", "harmless"):
        for key in keys:
            cells = []
            for role in roles:
                value = result.summary[role][kind]["overall"].get(key)
                if key == "judge_errors":
                    cells.append(str(value))
                else:
                    cells.append("–" if value is None else f"{100 * value:.1f}%")
            table.add_row(kind, key.replace("_", " "), *cells)
    out.print(table)
    out.print(
        f"wrote {escape(str(result.out))} (report.md, report.json, report.png, completions.jsonl)"
    )


@app.command("compare")
def compare_cmd(
    base: Annotated[str, typer.Argument(help=_help(CompareConfig, "base"))],
    edited: Annotated[str, typer.Argument(help=_help(CompareConfig, "edited"))],
    prompts: Annotated[str | None, typer.Option(help=_help(CompareConfig, "prompts"))] = None,
    column: Annotated[str, typer.Option(help=_help(CompareConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(CompareConfig, "split"))] = "train",
    n: Annotated[int, typer.Option("--n", help=_help(CompareConfig, "n"))] = 8,
    seed: Annotated[int, typer.Option(help=_help(CompareConfig, "seed"))] = 0,
    max_new_tokens: Annotated[int, typer.Option(help=_help(CompareConfig, "max_new_tokens"))] = 128,
    system: Annotated[str | None, typer.Option(help=_help(CompareConfig, "system"))] = None,
    dtype: Annotated[DType, typer.Option(help=_help(CompareConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(CompareConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(CompareConfig, "batch_size"))] = 32,
    report: Annotated[Path, typer.Option(help=_help(CompareConfig, "report"))] = Path("compare.md"),
    overwrite: Annotated[bool, typer.Option(help=_help(CompareConfig, "overwrite"))] = False,
) -> None:
    """Both models' answers to the same prompts, side by side, in the terminal and as
    Markdown: the first thing to look at before publishing an edit."""
    from .compare import compare as run_compare

    cfg = _run(
        lambda: CompareConfig(
            base=base,
            edited=edited,
            prompts=prompts,
            column=column,
            split=split,
            n=n,
            seed=seed,
            max_new_tokens=max_new_tokens,
            system=system,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            report=report,
            overwrite=overwrite,
        )
    )
    pairs = _run(lambda: run_compare(cfg, log=_log), cfg.report)
    table = Table(title="base vs edited", show_lines=True)
    table.add_column("prompt", ratio=1, overflow="fold")
    table.add_column("base", ratio=2, overflow="fold")
    table.add_column("edited", ratio=2, overflow="fold")
    for pair in pairs:
        table.add_row(
            escape(pair.prompt) + (f"\n[dim]({pair.kind})[/dim]" if pair.kind else ""),
            f"[dim]{pair.base_verdict}[/dim]\n" + escape(pair.base),
            f"[dim]{pair.edited_verdict}[/dim]\n" + escape(pair.edited),
        )
    out.print(table)
    out.print(f"wrote {escape(str(cfg.report))}")


@app.command("run")
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder of the run.")],
    start: Annotated[
        Stage | None, typer.Option("--from", metavar="STAGE", help="Rerun from this stage on.")
    ] = None,
    only: Annotated[
        Stage | None, typer.Option(metavar="STAGE", help="Rerun only this stage.")
    ] = None,
) -> None:
    """Run a recipe's stages in order (measure or a fixed direction, apply, verify, eval bench,
    eval safety, push) into one folder, skipping stages that are up to date; rerunning after an
    interruption resumes. Exit 1 when verify fails or the benchmark regresses (nothing is
    published then)."""
    from .recipe import run as run_recipe

    with Progress(*_columns(), console=err, transient=True) as bar:
        # two rows: the run (stage k of n, its elapsed time) and the running stage's step
        run_row = bar.add_task("run", total=None)

        def on_stage(k: int, n: int, name: str) -> None:
            bar.update(run_row, description=f"run: stage {k}/{n}, {name}", total=n)
            bar.update(run_row, completed=k - 1)

        step = _stage_bar(bar, bar.add_task("loading", total=None))
        state = _run(
            lambda: run_recipe(
                recipe,
                out_dir,
                start=start,
                only=only,
                log=_log,
                progress=step,
                on_stage=on_stage,
            ),
            interrupted="interrupted: finished stages are kept; run the same command to resume.",
        )
    table = Table(title=f"run: {escape(str(out_dir))}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("output sha256")
    for name, stage in state["stages"].items():
        table.add_row(name, f"{stage['seconds']:.1f}", (stage["outputs"] or "")[:16])
    out.print(table)


@app.command("push")
def push_cmd(
    model_dir: Annotated[Path, typer.Argument(help=_help(PushConfig, "model_dir"))],
    repo_id: Annotated[str, typer.Argument(help=_help(PushConfig, "repo_id"))],
    eval_dir: Annotated[Path | None, typer.Option("--eval", help=_help(PushConfig, "eval"))] = None,
    private: Annotated[bool, typer.Option(help=_help(PushConfig, "private"))] = False,
    revision: Annotated[str | None, typer.Option(help=_help(PushConfig, "revision"))] = None,
    method: Annotated[PushMethod, typer.Option(help=_help(PushConfig, "method"))] = "auto",
    message: Annotated[str | None, typer.Option(help=_help(PushConfig, "message"))] = None,
    dry_run: Annotated[bool, typer.Option(help=_help(PushConfig, "dry_run"))] = False,
    ignore_license_name: Annotated[
        bool, typer.Option(help=_help(PushConfig, "ignore_license_name"))
    ] = False,
) -> None:
    """Publish an edited checkpoint to the Hugging Face Hub: weights, config, tokenizer, the
    card (with evaluation results from --eval) and the direction under orthoedit/. The token
    comes from HF_TOKEN or `hf auth login`. Exit 1 when the upload breaks off (rerun to
    resume), 2 for bad input."""
    from .publish import push

    cfg = _run(
        lambda: PushConfig(
            model_dir=model_dir,
            repo_id=repo_id,
            eval=eval_dir,
            private=private,
            revision=revision,
            method=method,
            message=message,
            dry_run=dry_run,
            ignore_license_name=ignore_license_name,
        )
    )
    log = lambda m: err.print(f"[dim]{escape(m)}[/dim]", highlight=False)  # noqa: E731
    result = _run(
        lambda: push(cfg, log=log),
        interrupted="interrupted: run the same command again to resume the upload.",
    )
    plan = result.plan
    if dry_run:
        table = Table(title=f"{plan.repo_id} @ {plan.revision} ({plan.method}), not uploaded")
        table.add_column("path in repo")
        table.add_column("bytes", justify="right")
        table.add_column("from")
        for item in plan.items:
            table.add_row(escape(item.path_in_repo), f"{item.size:,}", escape(item.origin))
        out.print(table)
        out.print(f"{len(plan.items)} files, {plan.total:,} bytes. The card (README.md):")
        out.print(plan.card, markup=False, highlight=False, soft_wrap=True)
        return
    for path in result.deleted:
        log(f"deleted stale {path}")
    out.print(
        f"pushed {len(plan.items)} files ({plan.total / 1e9:.2f} GB) to {escape(plan.repo_id)} "
        f"@ {escape(plan.revision)}: {escape(result.url or '')}"
    )


@app.command("demo")
def demo_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder of the run.")] = Path(
        "demo-out"
    ),
) -> None:
    """Run the model organism's recipe end to end, offline, on a CPU (about 30 s): measure,
    apply, verify, eval bench, eval safety; then print what changed and where the reports are."""
    from .demo import main

    code = main(str(out_dir))
    if code:
        raise typer.Exit(code)


study_app = typer.Typer(cls=Group, help="Research: where refusal lives.", no_args_is_help=True)
app.add_typer(study_app, name="study")


def _sites_table(result) -> Table:
    judged = any(o.unsafe is not None for o in result.outcomes)
    table = Table(
        title="removing the direction at each set of sites",
        caption="log-odds: refusal, harmful prompts; share: of the full run-time effect; "
        "KL: first token, harmless prompts. all = residual+attn+mlp at run time, "
        "embed+attn+mlp as a weight edit",
    )
    heads = ["condition", "sites", "log-odds", "Δ", "share", "refusal"]
    heads += ["unsafe"] if judged else []
    for name in [*heads, "KL"]:
        left = name in ("condition", "sites")
        table.add_column(name, justify="left" if left else "right", no_wrap=left)
    for o in result.outcomes:
        sites = "–" if o.kind == "baseline" else o.name
        if not o.applicable:
            table.add_row(o.kind, sites, *["n/a"] * (len(heads) - 1))
            continue
        share = "–" if o.share is None else f"{100 * o.share:.0f}%"
        cells = [f"{o.log_odds:.3f}", f"{o.delta:+.3f}", share, f"{100 * o.refusal:.1f}%"]
        if judged:
            cells.append("–" if o.unsafe is None else f"{100 * o.unsafe:.1f}%")
        table.add_row(o.kind, sites, *cells, f"{o.kl:.4f}")
    return table


@study_app.command("sites")
def study_sites(
    model: Annotated[str, typer.Argument(help=_help(StudySitesConfig, "model"))],
    direction: Annotated[Path, typer.Option(help=_help(StudySitesConfig, "direction"))],
    out_dir: Annotated[Path, typer.Option("--out", help=_help(StudySitesConfig, "out"))],
    direction_layer: Annotated[
        int | None, typer.Option(help=_help(StudySitesConfig, "direction_layer"))
    ] = None,
    harmful: Annotated[str | None, typer.Option(help=_help(StudySitesConfig, "harmful"))] = None,
    harmless: Annotated[str | None, typer.Option(help=_help(StudySitesConfig, "harmless"))] = None,
    column: Annotated[str, typer.Option(help=_help(StudySitesConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(StudySitesConfig, "split"))] = "train",
    n: Annotated[int, typer.Option("--n", help=_help(StudySitesConfig, "n"))] = 64,
    seed: Annotated[int, typer.Option(help=_help(StudySitesConfig, "seed"))] = 0,
    refusal_tokens: Annotated[
        str | None, typer.Option(help=_help(StudySitesConfig, "refusal_tokens"))
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help=_help(StudySitesConfig, "max_new_tokens"))
    ] = 64,
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_api_key_env: JudgeKeyEnvOpt = "OPENAI_API_KEY",
    judge_timeout: JudgeTimeoutOpt = 60.0,
    judge_retries: JudgeRetriesOpt = 2,
    system: Annotated[str | None, typer.Option(help=_help(StudySitesConfig, "system"))] = None,
    template: Annotated[Path | None, typer.Option(help=_help(StudySitesConfig, "template"))] = None,
    revision: Annotated[str | None, typer.Option(help=_help(StudySitesConfig, "revision"))] = None,
    dtype: Annotated[DType, typer.Option(help=_help(StudySitesConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(StudySitesConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(StudySitesConfig, "batch_size"))] = 32,
    overwrite: Annotated[bool, typer.Option(help=_help(StudySitesConfig, "overwrite"))] = False,
) -> None:
    """Which sites must lose the direction to remove refusal: baseline, run-time ablation at
    the block inputs, attention outputs, MLP outputs or all three, and the weight edits
    apply would make (embed, attn, mlp, all); refusal log-odds, refusal rate and KL of each,
    and with --judge the unsafe rate."""
    from .study import study_sites as run_study

    cfg = _run(
        lambda: StudySitesConfig(
            model=model,
            direction=direction,
            out=out_dir,
            direction_layer=direction_layer,
            harmful=harmful,
            harmless=harmless,
            column=column,
            split=split,
            n=n,
            seed=seed,
            refusal_tokens=refusal_tokens,
            max_new_tokens=max_new_tokens,
            judge=judge,
            judge_model=judge_model,
            judge_api_key_env=judge_api_key_env,
            judge_timeout=judge_timeout,
            judge_retries=judge_retries,
            system=system,
            template=template,
            revision=revision,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    )
    with _progress() as progress:
        result = _run(
            lambda: run_study(
                cfg,
                log=_log,
                progress=progress,
            ),
            cfg.out,
        )
    out.print(_sites_table(result))
    out.print(escape(result.finding), soft_wrap=True)
    folder = escape(str(result.out))
    out.print(f"wrote {folder}/sites.json, {folder}/sites.md, {folder}/sites.png")


@app.command("attribute")
def attribute_cmd(
    model: Annotated[str, typer.Argument(help=_help(AttributeConfig, "model"))],
    direction: Annotated[Path, typer.Option(help=_help(AttributeConfig, "direction"))],
    out_dir: Annotated[Path, typer.Option("--out", help=_help(AttributeConfig, "out"))],
    direction_layer: Annotated[
        int | None, typer.Option(help=_help(AttributeConfig, "direction_layer"))
    ] = None,
    harmful: Annotated[str | None, typer.Option(help=_help(AttributeConfig, "harmful"))] = None,
    harmless: Annotated[str | None, typer.Option(help=_help(AttributeConfig, "harmless"))] = None,
    column: Annotated[str, typer.Option(help=_help(AttributeConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(AttributeConfig, "split"))] = "train",
    n: Annotated[int, typer.Option("--n", help=_help(AttributeConfig, "n"))] = 64,
    seed: Annotated[int, typer.Option(help=_help(AttributeConfig, "seed"))] = 0,
    refusal_tokens: Annotated[
        str | None, typer.Option(help=_help(AttributeConfig, "refusal_tokens"))
    ] = None,
    steps: Annotated[int, typer.Option(help=_help(AttributeConfig, "steps"))] = 4,
    top: Annotated[int, typer.Option(help=_help(AttributeConfig, "top"))] = 10,
    cumulative: Annotated[int, typer.Option(help=_help(AttributeConfig, "cumulative"))] = 30,
    system: Annotated[str | None, typer.Option(help=_help(AttributeConfig, "system"))] = None,
    template: Annotated[Path | None, typer.Option(help=_help(AttributeConfig, "template"))] = None,
    revision: Annotated[str | None, typer.Option(help=_help(AttributeConfig, "revision"))] = None,
    dtype: Annotated[DType, typer.Option(help=_help(AttributeConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(AttributeConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(AttributeConfig, "batch_size"))] = 32,
    overwrite: Annotated[bool, typer.Option(help=_help(AttributeConfig, "overwrite"))] = False,
) -> None:
    """Which residual writers carry refusal: every embedding, attention head and MLP at the
    last prompt token, ranked by the first-order change of the refusal log-odds when patched
    from the harmful to the harmless mean, the top ones checked by real patching, with the
    cumulative curve and a layer x head map."""
    from .attribute import attribute

    cfg = _run(
        lambda: AttributeConfig(
            model=model,
            direction=direction,
            out=out_dir,
            direction_layer=direction_layer,
            harmful=harmful,
            harmless=harmless,
            column=column,
            split=split,
            n=n,
            seed=seed,
            refusal_tokens=refusal_tokens,
            steps=steps,
            top=top,
            cumulative=cumulative,
            system=system,
            template=template,
            revision=revision,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    )
    with _progress() as progress:
        result = _run(
            lambda: attribute(
                cfg,
                log=_log,
                progress=progress,
            ),
            cfg.out,
        )
    table = Table(title="change of refusal log-odds when patched: largest estimates, checked")
    columns = ("component", "integrated", "first order", "patched", "proj. harmful",
               "proj. harmless")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "component" else "right")
    for c in sorted(result.components, key=lambda c: -abs(c.estimate))[: max(10, cfg.top)]:
        patched = "–" if c.patched is None else f"{c.patched:+.3f}"
        table.add_row(
            c.name,
            f"{c.estimate:+.3f}",
            f"{c.first_order:+.3f}",
            patched,
            f"{c.harmful_proj:+.3f}",
            f"{c.harmless_proj:+.3f}",
        )
    out.print(table)
    out.print(
        f"harmful {result.baseline:.3f}, harmless {result.harmless:.3f}, direction ablated "
        f"{result.ablated:.3f} (refusal log-odds)"
    )
    folder = escape(str(result.out))
    out.print(f"wrote {folder}/attribution.md, attribution.json, cumulative.png, heads.png")


def _front_table(result) -> Table:
    chosen = result.chosen
    table = Table(
        title=f"Pareto front: {len(result.front)} of {len(result.trials)} trials",
        caption="failure: refused or broken answers to the harmful validation prompts; "
        "KL: first token, harmless validation prompts",
    )
    drop = result.front and result.front[0].user_attrs.get("drop") is not None
    names = ("trial", "failure", "refused", "broken", "KL", *(["drop"] if drop else []), "")
    for name in names:
        table.add_column(name, justify="right" if name not in ("trial", "") else "left")

    def cells(o: dict) -> list[str]:
        row = [f"{o['failure']:.1%}", str(o["refused"]), str(o["broken"]), f"{o['kl']:.4g}"]
        return row + ([f"{o['drop']:.3g}"] if drop else [])

    for t in result.front:
        mark = "[bold green]chosen[/]" if chosen is not None and t.number == chosen.number else ""
        table.add_row(str(t.number), *cells(t.user_attrs), mark)
    for name, o in result.baselines.items():
        what = "measure's selection" if name == "measure" else "unedited"
        table.add_row(what, *cells(o), "")
    return table


def _span(text: str | None) -> list[str] | None:
    """``LO:HI`` (or one number) as the two ends pydantic validates."""
    if text is None:
        return None
    ends = text.split(":", 1)
    return ends * 2 if len(ends) == 1 else ends


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@app.command("search")
def search_cmd(
    model: Annotated[str, typer.Argument(help=_help(SearchConfig, "model"))],
    candidates: Annotated[Path, typer.Option(help=_help(SearchConfig, "candidates"))],
    out_dir: Annotated[Path, typer.Option("--out", help=_help(SearchConfig, "out"))],
    trials: Annotated[int, typer.Option(help=_help(SearchConfig, "trials"))] = 50,
    max_kl: Annotated[float, typer.Option(help=_help(SearchConfig, "max_kl"))] = 0.1,
    max_failure: Annotated[
        str | None, typer.Option(help=_help(SearchConfig, "max_failure"))
    ] = None,
    objective: Annotated[
        Literal["front", "budget"], typer.Option(help=_help(SearchConfig, "objective"))
    ] = "front",
    failure_cost: Annotated[float, typer.Option(help=_help(SearchConfig, "failure_cost"))] = 0.05,
    profile: Annotated[
        Literal["shape", "free"], typer.Option(help=_help(SearchConfig, "profile"))
    ] = "shape",
    direction_layers: Annotated[
        str | None,
        typer.Option(metavar="LO:HI", help=_help(SearchConfig, "direction_layers")),
    ] = None,
    positions: Annotated[
        str | None,
        typer.Option(help=_help(SearchConfig, "positions") + " Comma-separated."),
    ] = None,
    embed: Annotated[
        Literal["search", "on", "off"], typer.Option(help=_help(SearchConfig, "embed"))
    ] = "search",
    seed: Annotated[int, typer.Option(help=_help(SearchConfig, "seed"))] = 0,
    startup_trials: Annotated[int, typer.Option(help=_help(SearchConfig, "startup_trials"))] = 10,
    time_budget: Annotated[
        float | None, typer.Option(help=_help(SearchConfig, "time_budget"))
    ] = None,
    harmful: Annotated[str | None, typer.Option(help=_help(SearchConfig, "harmful"))] = None,
    harmless: Annotated[str | None, typer.Option(help=_help(SearchConfig, "harmless"))] = None,
    column: Annotated[str, typer.Option(help=_help(SearchConfig, "column"))] = "prompt",
    split: Annotated[str, typer.Option(help=_help(SearchConfig, "split"))] = "train",
    n: Annotated[int | None, typer.Option("--n", help=_help(SearchConfig, "n"))] = None,
    max_new_tokens: Annotated[int, typer.Option(help=_help(SearchConfig, "max_new_tokens"))] = 64,
    judge: JudgeOpt = None,
    judge_model: JudgeModelOpt = None,
    judge_api_key_env: JudgeKeyEnvOpt = "OPENAI_API_KEY",
    judge_timeout: JudgeTimeoutOpt = 60.0,
    judge_retries: JudgeRetriesOpt = 2,
    max_surprisal: Annotated[
        float | None, typer.Option(help=_help(SearchConfig, "max_surprisal"))
    ] = None,
    eval_task: Annotated[str | None, typer.Option(help=_help(SearchConfig, "eval_task"))] = None,
    eval_limit: Annotated[int, typer.Option(help=_help(SearchConfig, "eval_limit"))] = 50,
    max_drop: Annotated[float | None, typer.Option(help=_help(SearchConfig, "max_drop"))] = None,
    system: Annotated[str | None, typer.Option(help=_help(SearchConfig, "system"))] = None,
    template: Annotated[Path | None, typer.Option(help=_help(SearchConfig, "template"))] = None,
    revision: Annotated[str | None, typer.Option(help=_help(SearchConfig, "revision"))] = None,
    dtype: Annotated[DType, typer.Option(help=_help(SearchConfig, "dtype"))] = "float32",
    device: Annotated[str | None, typer.Option(help=_help(SearchConfig, "device"))] = None,
    batch_size: Annotated[int, typer.Option(help=_help(SearchConfig, "batch_size"))] = 32,
    overwrite: Annotated[bool, typer.Option(help=_help(SearchConfig, "overwrite"))] = False,
) -> None:
    """Search the edit (direction layer and position, per-layer attention and MLP weights,
    embedding on or off) against measured refusal and damage, with run-time hooks; write the
    Pareto front and the best edit within the KL budget, with the apply command that
    reproduces it. Resumes the study in --out. With --judge, a complied answer counts as
    compliance only when the judge calls it unsafe."""
    from .search import none_chosen, search

    cfg = _run(
        lambda: SearchConfig(
            model=model,
            candidates=candidates,
            out=out_dir,
            trials=trials,
            max_kl=max_kl,
            max_failure=max_failure,
            objective=objective,
            failure_cost=failure_cost,
            profile=profile,
            direction_layers=_span(direction_layers),
            positions=None if positions is None else _items(positions),
            embed=embed,
            seed=seed,
            startup_trials=startup_trials,
            time_budget=time_budget,
            harmful=harmful,
            harmless=harmless,
            column=column,
            split=split,
            n=n,
            max_new_tokens=max_new_tokens,
            judge=judge,
            judge_model=judge_model,
            judge_api_key_env=judge_api_key_env,
            judge_timeout=judge_timeout,
            judge_retries=judge_retries,
            max_surprisal=max_surprisal,
            eval_task=eval_task,
            eval_limit=eval_limit,
            max_drop=max_drop,
            system=system,
            template=template,
            revision=revision,
            dtype=dtype,
            device=device,
            batch_size=batch_size,
            overwrite=overwrite,
        )
    )
    with _progress() as progress:
        result = _run(
            lambda: search(
                cfg,
                log=_log,
                progress=progress,
            ),
            interrupted="interrupted: run the same command again to resume the search.",
        )
    out.print(_front_table(result))
    folder = escape(str(result.out))
    out.print(f"wrote {folder}/pareto.md, pareto.json, pareto.png")
    if result.chosen is None:
        err.print(
            f"[red]error:[/red] {escape(none_chosen(result.trials, cfg, result.baselines))}; "
            "see the front above, loosen the budget or run more --trials.",
            highlight=False,
        )
        raise typer.Exit(1)
    chosen = result.chosen
    out.print(
        f"chosen: trial {chosen.number}, failure {chosen.user_attrs['failure']:.1%}, KL "
        f"{chosen.user_attrs['kl']:.4g}; reproduce it with {folder}/chosen/apply.txt"
    )


def entry() -> None:
    """The ``orthoedit`` executable: SIGTERM (a CI timeout, ``docker stop``) interrupts like
    Ctrl-C, so staged outputs are removed and nothing is left half-written."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Exception as e:  # outside a command's _run: still one line, not a traceback
        try:
            _bug(e)
        except typer.Exit as done:
            raise SystemExit(done.exit_code) from None


def _terminate(signum, frame) -> None:
    raise Terminated()


if __name__ == "__main__":
    entry()
