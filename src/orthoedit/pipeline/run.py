"""``orthoedit run``: the stages of a recipe (``pipeline.recipe``), resumable, into one folder.

Stages run in order into ``OUT/direction``, ``OUT/search``, ``OUT/model``, ``OUT/verify.json``,
``OUT/eval/bench``, ``OUT/eval/safety``, ``OUT/eval/kl.json``, ``OUT/gguf``, ``OUT/publish.json``;
``OUT/run.json`` records each finished stage with the hash of its inputs (its options and the
hashes of the outputs it reads) and of its outputs. A stage whose recorded inputs and outputs
still match is skipped, so a run that was interrupted resumes where it stopped; each stage
writes through a temporary folder, so an interrupted stage leaves nothing half-written. The
publish stage runs only when verify passed and the benchmark did not regress.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import BadInputError, CheckFailedError
from ..folders import MeasureFolder, RunFolder, SearchFolder
from ..output import check_apart, check_target, inputs_of, staged_output, write_file
from .recipe import EVALUATED, STAGES, Recipe, load_recipe, stage_configs

if TYPE_CHECKING:
    from ..progress import Progress


def _digest(path: Path) -> str | None:
    """sha256 over a file, or over every file of a folder (relative names and bytes)."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


UPSTREAM = {
    "search": ["direction"],
    "model": ["direction", "search"],
    "verify": ["model"],
    "bench": ["model"],
    "safety": ["model"],
    "kl": ["model"],
    "gguf": ["model"],
    "publish": ["model", *EVALUATED, "gguf"],
}


def _inputs_hash(cfg, upstream: dict[str, str | None]) -> str:
    # by name, not field order: options declared in another order are the same options
    options = str(cfg) if isinstance(cfg, Path) else cfg.model_dump(mode="json")
    blob = json.dumps({"options": options, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_run_folder(out: Path, configs: dict) -> None:
    """The run folder holds only what runs of recipes wrote (run.json says so), and none of
    the recipe's own inputs; a stage folder there that orthoedit did not write is refused
    before any stage runs."""
    reads = [p for c in configs.values() for p in ([c] if isinstance(c, Path) else inputs_of(c))]
    check_apart(out, [p for p in reads if p != out and out not in p.parents], "--out")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder.")
    if out.is_dir() and not RunFolder(out).record.is_file() and any(out.iterdir()):
        raise BadInputError(
            f"--out {out} exists and is not a run folder of orthoedit (it has no run.json); "
            "choose a new folder."
        )
    for name in configs:
        target = RunFolder(out).output(name)
        if name != "search" and target.is_dir():  # a search resumes in place
            check_target(target, overwrite=True)


def _write_state(out: Path, state: dict) -> None:
    write_file(RunFolder(out).record, json.dumps(state, indent=2) + "\n")


def run(recipe_path: Path, out: Path, **options) -> dict:
    """Run (or resume) a recipe file; returns run.json's content. Raises CheckFailedError
    after the last stage when verify failed or the benchmark regressed. ``options``: those of
    ``run_recipe`` (start, only, log, progress, on_stage)."""
    recipe, base = load_recipe(recipe_path)
    return run_recipe(recipe, base, out, source=str(Path(recipe_path).resolve()), **options)


def run_recipe(
    recipe: Recipe,
    base: Path,
    out: Path,
    *,
    source: str,
    start: str | None = None,
    only: str | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    on_stage: Callable[[int, int, str], None] | None = None,
) -> dict:
    """``run`` for a recipe already loaded; relative paths in it resolve against ``base``.

    Every log line goes to ``log`` and, with the time, to OUT/run.log; ``progress`` gets the
    running stage's steps, and ``on_stage(k, n, name)`` is called as stage k of n starts."""
    out = Path(out).expanduser().resolve()
    configs = stage_configs(recipe, base, out)
    order = [s for s in STAGES if s in configs]
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in order:
            raise BadInputError(f"{flag} {name}: this recipe's stages are {', '.join(order)}.")
    _check_run_folder(out, configs)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    state = _open_state(out, recipe, source)
    stages = state.setdefault("stages", {})
    _write_state(out, state)  # a run folder from the start, even if its first stage fails
    log = _logged(log, RunFolder(out).log)
    failures: list[str] = []
    for k, name in enumerate(order, 1):
        step = f"[{k}/{len(order)}] "
        if on_stage is not None:
            on_stage(k, len(order), name)
        upstream = {
            u: stages.get(u, {}).get("outputs") for u in UPSTREAM.get(name, []) if u in order
        }
        inputs = _inputs_hash(configs[name], upstream)
        target = RunFolder(out).output(name)
        done = stages.get(name)
        if not _runs(name, order, start, only, done, inputs, target):
            if only is None:
                log(f"{step}{name}: up to date, skipped")
            # a failed check stays failed until its inputs change
            failures += [f"{name}: {done['failed']}"] if done and done.get("failed") else []
            continue
        if name == "publish" and failures:
            log(f"{step}publish: not run, since " + "; ".join(failures))
            continue
        log(f"{step}{name}: running")
        ran = _timed_stage(name, configs[name], target, log, progress, "search" in configs)
        stages[name] = {"inputs": inputs, **ran}
        _write_state(out, state)
        log(f"{step}{name}: done in {stages[name]['seconds']:.1f} s")
        if stages[name].get("failed"):
            failures.append(f"{name}: {stages[name]['failed']}")
    _write_state(out, state)
    if failures:
        raise CheckFailedError("; ".join(failures) + f" (reports in {out})")
    return state


def _runs(name: str, order: list, start, only, done: dict | None, inputs: str, target) -> bool:
    """Whether stage ``name`` runs: it is ``--only``, at or after ``--from``, or not up to
    date; never when another stage is ``--only`` (one before it must have run)."""
    if only is not None and name != only:
        if order.index(name) < order.index(only) and (done or {}).get("outputs") is None:
            raise BadInputError(f"--only {only}: stage {name} has not run yet.")
        return False
    forced = only == name or (start is not None and order.index(name) >= order.index(start))
    return forced or not _up_to_date(done, inputs, target)


def _remove_stale(out: Path) -> None:
    """Staging left by a run that was killed mid-stage (an interrupt cleans up after itself)."""
    for stale in (*out.glob(".*.orthoedit-*"), *out.glob(".*.old-*"), *out.glob(".*.tmp")):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _open_state(out: Path, recipe: Recipe, source: str) -> dict:
    """run.json as stored (or new), with this run's recipe, settings and versions."""
    import torch
    import transformers

    path = RunFolder(out).record
    state = json.loads(path.read_text()) if path.is_file() else {}
    settings = recipe.model_dump(mode="json")
    if isinstance(settings.get("search"), dict) and settings["search"].get("storage"):
        from ..search.storage import masked

        # a study database's URL may hold a password: never stored
        settings["search"]["storage"] = masked(settings["search"]["storage"])
    state.update(
        recipe=source,
        settings=settings,
        versions={
            "orthoedit": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    )
    return state


def _up_to_date(done: dict | None, inputs: str, target: Path) -> bool:
    """A stage ran with these inputs and its output is still what it wrote."""
    return bool(done) and done.get("inputs") == inputs and done.get("outputs") == _digest(target)


def _timed_stage(name: str, cfg, target: Path, log, progress, searched: bool) -> dict:
    """Run one stage; its record: outputs' digest, seconds and what the stage returned."""
    began = time.perf_counter()
    result = _run_stage(name, cfg, target, log, progress, searched=searched)
    gc.collect()  # a stage's model is held in reference cycles: free it before the next
    return {"outputs": _digest(target), "seconds": round(time.perf_counter() - began, 3), **result}


def _logged(log: Callable[[str], None], path: Path) -> Callable[[str], None]:
    """``log``, and each line appended to ``path`` with the time of day."""

    def both(message: str) -> None:
        log(message)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return both


def _run_stage(name: str, cfg, target: Path, log, progress=None, searched: bool = False) -> dict:
    """Run stage ``name``; what run.json records of it (``failed`` when its check failed)."""
    if name == "model":
        return _edit(cfg, progress, searched)
    return _RUNNERS[name](cfg, target, log, progress)


def _direction(cfg, target: Path, log, progress) -> dict:
    if isinstance(cfg, Path):  # a fixed direction file
        with staged_output(check_target(target, [cfg], overwrite=True)) as tmp:
            shutil.copyfile(cfg, MeasureFolder(tmp).direction)
        return {"source": str(cfg)}
    from ..measure.candidates import measure

    result = measure(cfg, log=log, progress=progress)
    return {"layer": result.layer, "position": result.position}


def _search(cfg, target: Path, log, progress) -> dict:
    from ..search import chosen_sites, none_chosen, objectives, search

    result = search(cfg, log=log, progress=progress, replace_other=True)
    folder = SearchFolder(target)
    if result.chosen is None:
        raise CheckFailedError(
            f"search: {none_chosen(result.trials, cfg, result.baselines, result.strong)}, after "
            f"{len(result.trials)} trials; see "
            f"{folder.pareto_md}, then loosen the budget or raise search.trials and run "
            "again (the study resumes)."
        )
    if not chosen_sites(folder.chosen.scales):
        raise CheckFailedError(
            f"search: the best trial within the budget (#{result.chosen.number}) edits "
            f"nothing; see {folder.pareto_md}, then loosen the budget or raise search.trials."
        )
    ran = {"trial": result.chosen.number, "values": objectives(result.chosen, result.strong)}
    found = result.confirmation
    if cfg.confirm and found is not None:
        ran["confirmed"] = found["confirmed"]
        if not found["confirmed"]:
            failure = found["failure"]
            ran["failed"] = (
                f"trial {result.chosen.number} not confirmed on held-out prompts: failure "
                f"{failure['model']:.1%} against the unedited model's {failure['base']:.1%} "
                f"(see {folder.confirm.md})"
            )
    return ran


def _edit(cfg, progress, searched: bool) -> dict:
    from ..edit import apply as stage

    if searched:  # the chosen trial's sites: those its scales edit at all
        from ..search import chosen_sites

        cfg = cfg.model_copy(update={"sites": chosen_sites(cfg.scales)})
    prepared = stage.prepare(cfg)
    if progress is not None:
        progress.start("editing shards", stage.edit_size(prepared))
    stage.execute(prepared, cfg.out, cfg.overwrite, progress and progress.advance)
    return {"tensors_edited": len(prepared.plan.ops)}


def _verify(cfg, target: Path, log, progress) -> dict:
    from ..verify import verify

    report = verify(cfg, log=log)  # writes its report to the target
    return {"passed": report.passed, "failed": "; ".join(report.failures) or None}


def _bench(cfg, target: Path, log, progress) -> dict:
    from ..evaluate.bench import eval_bench

    result = eval_bench(cfg, log=log, progress=progress)
    names = [f"{r.task} {r.metric}" for r in result.regressions]
    return {"regressions": names, "failed": ("regression: " + ", ".join(names)) if names else None}


def _safety(cfg, target: Path, log, progress) -> dict:
    from ..evaluate.safety import eval_safety

    return {"summary": eval_safety(cfg, log=log, progress=progress).summary}


def _kl(cfg, target: Path, log, progress) -> dict:
    from ..evaluate.kl import eval_kl

    report = eval_kl(cfg, log=log)  # writes its numbers to the target
    return {"first_token_kl": report.first_token_kl}


def _gguf(cfg, target: Path, log, progress) -> dict:
    from ..export.gguf import export_gguf

    exported = export_gguf(cfg, log=log, progress=progress)
    return {"files": {f.name: f.type for f in exported.files}}


def _publish(cfg, target: Path, log, progress) -> dict:
    from ..publish import push

    pushed = push(cfg, log=log)
    write_file(target, json.dumps(pushed.record(), indent=2) + "\n")
    return {"url": pushed.url, "dry_run": cfg.dry_run}


#: How each stage (but the edit) runs.
_RUNNERS = {
    "direction": _direction,
    "search": _search,
    "verify": _verify,
    "bench": _bench,
    "safety": _safety,
    "kl": _kl,
    "gguf": _gguf,
    "publish": _publish,
}
