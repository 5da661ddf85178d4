"""Time a recipe end to end, stage by stage, and tabulate its results: by default the
development model's, ``recipes/qwen2.5-coder-0.5b-instruct.yaml`` (``make qwen`` first).

It runs (or resumes) ``orthoedit run RECIPE --out WORK``; a finished run folder is only read
again, since ``run.json`` keeps each stage's seconds. Reported:

* seconds per stage and in all (``run.json``), and per search trial (median and range, from
  the study's trials);
* the test split's numbers, base beside edited (``eval safety``): harmful and harmless
  refusal rates and the broken answers (empty, looping, word salad), counted apart;
* first-token KL and cross-entropy on harmless test prompts (``eval kl``);
* every benchmark metric, base beside edited (``eval bench``).

Results: printed as Markdown and written to ``benchmarks/results-recipe.json``.

Usage: ``.venv/bin/python benchmarks/bench_recipe.py [--recipe R] [--work DIR]``; ``--smoke``
runs a short recipe of the model organism instead (measure at its selection on a few prompts,
edit, verify, eval kl on 16 prompts) and writes its results only to ``--results`` given
(seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from orthoedit.errors import CheckFailedError
from orthoedit.folders import RunFolder
from orthoedit.pipeline.run import run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


#: --smoke's recipe: every stage's code path that a run folder's tables read, in seconds.
SMOKE_RECIPE = """\
model: {organism}/chat
measure:
  harmful: {organism}/prompts/harmful-train.jsonl
  harmless: {organism}/prompts/harmless-train.jsonl
  n_train: 16
  n_val: 8
  filter: false
  layer: 2
  position: -1
edit: {{}}
verify: {{}}
kl:
  prompts: {organism}/prompts/harmless-test.jsonl
  n: 16
  dtype: float32
"""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipe", type=Path, default=ROOT / "recipes" / "qwen2.5-coder-0.5b-instruct.yaml"
    )
    p.add_argument("--work", type=Path, default=HERE / "work" / "recipe")
    p.add_argument("--results", type=Path, default=None, help="default: results-recipe.json")
    p.add_argument("--smoke", action="store_true", help="a short organism recipe")
    args = p.parse_args(argv)
    if args.smoke:
        args.work.parent.mkdir(parents=True, exist_ok=True)
        args.recipe = args.work.parent / f"{args.work.name}-smoke.yaml"
        args.recipe.write_text(
            SMOKE_RECIPE.format(organism=ROOT / "src" / "orthoedit" / "organism")
        )
    elif args.results is None:
        args.results = HERE / "results-recipe.json"
    return args


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: Path) -> dict:
    """Everything the tables show, from a run folder."""
    run = RunFolder(out)
    state = json.loads(run.record.read_text())
    stages = {name: s["seconds"] for name, s in state["stages"].items()}
    result: dict = {"stages_s": stages, "total_s": sum(stages.values())}
    search = _json(run.search.pareto_json)
    if search:
        seconds = [t["seconds"] for t in search["trials"]]
        result["search"] = {
            "trials": len(seconds),
            "trial_s_median": statistics.median(seconds),
            "trial_s_min": min(seconds),
            "trial_s_max": max(seconds),
            "chosen": search["chosen"]
            and {k: search["chosen"][k] for k in ("number", "failure", "kl")},
        }
    safety = _json(run.safety.json)
    if safety:
        result["safety"] = {
            role: {
                kind: safety["summary"][role][kind]["overall"] for kind in ("harmful", "harmless")
            }
            for role in safety["summary"]
        }
    result["kl"] = _json(run.kl)
    bench = _json(run.bench.json)
    if bench:
        result["bench"] = [
            {k: r[k] for k in ("task", "metric", "base", "edited", "delta", "stderr", "regressed")}
            for r in bench["rows"]
        ]
    direction = run.direction.read_record()
    if direction:
        result["direction"] = {k: direction.get(k) for k in ("layer", "position", "passed_filters")}
    return result


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(r: dict) -> str:
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {s:.0f} |" for name, s in r["stages_s"].items()]
    lines.append(f"| **all** | **{r['total_s']:.0f}** ({r['total_s'] / 60:.1f} min) |")
    if r.get("search"):
        s = r["search"]
        lines += [
            "",
            f"search: {s['trials']} trials, {s['trial_s_median']:.1f} s per trial (median; "
            f"{s['trial_s_min']:.1f} to {s['trial_s_max']:.1f}); chosen {s['chosen']}",
        ]
    if r.get("safety"):
        roles = list(r["safety"])
        lines += ["", "| test split | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
        for kind, key, label in (
            ("harmful", "refusal", "harmful prompts refused"),
            ("harmful", "broken", "harmful answers broken (empty, looping, word salad)"),
            ("harmless", "refusal", "harmless prompts refused (over-refusal)"),
            ("harmless", "broken", "harmless answers broken"),
        ):
            cells = " | ".join(_pct(r["safety"][role][kind][key]) for role in roles)
            lines.append(f"| {label} | {cells} |")
    if r.get("kl"):
        kl = r["kl"]
        ce = kl["cross_entropy"]
        lines += [
            "",
            f"eval kl on {kl['prompts']} harmless test prompts: first-token KL "
            f"{kl['first_token_kl']:.4f}; cross-entropy of the base's answers {ce['base']:.4f} "
            f"-> {ce['edited']:.4f} nats/token",
        ]
    if r.get("bench"):
        lines += [
            "",
            "| task | metric | base | edited | delta | stderr |",
            "|---|---|---|---|---|---|",
        ]
        for b in r["bench"]:
            err = "–" if b["stderr"] is None else f"{b['stderr']:.3f}"
            lines.append(
                f"| {b['task']} | {b['metric']} | {b['base']:.3f} | {b['edited']:.3f} | "
                f"{b['delta']:+.3f} | {err} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    failed = None
    try:
        run(args.recipe, args.work, log=print)
    except CheckFailedError as err:  # a failed check still leaves every report to read
        failed = str(err)
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "recipe": str(
            args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe
        ),
        "wall_s_this_call": time.perf_counter() - began,
        "failed": failed,
        **collect(args.work),
    }
    if args.results is not None:
        args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
