"""How much lower can the organism's KL go at measure's test refusal rate? A diagnostic for
``orthoedit search``'s acceptance point, not a selection: both searches below are run **on
the test split itself** (in-sample), so their numbers bound what a search on other prompts
can hope to reach there.

1. ``orthoedit search`` on the 240 + 240 test prompts (``--trials``, seed 0), chosen with
   ``--max-failure`` set to measure's own test failure rate;
2. a narrower space written for this question only: the direction blended between layers 2
   and 3 at the last position (where measure's candidates work on the organism), no
   embedding edit, and a free weight in [0, 1] for each of the 8 attention / MLP writers;
   one objective, KL + 0.05 per refusal beyond measure's count (Optuna TPE, seed 0).

Needs ``benchmarks/bench_search.py``'s measure folder (run it first, or pass ``--candidates``).
Results: printed and written to ``benchmarks/results-headroom.json``.

Usage: ``.venv/bin/python benchmarks/bench_headroom.py [--trials 150]``; ``--smoke`` runs both
searches with 2 trials on 8 + 8 test prompts (measuring the organism first, at its selection,
when there is no measure folder) and writes its results only to ``--results`` given (seconds;
the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_search  # noqa: E402
from orthoedit.folders import MeasureFolder  # noqa: E402
from orthoedit.model.direction import Direction  # noqa: E402
from orthoedit.search import measure_hooks, open_runner, prepare, ready_hooks  # noqa: E402
from orthoedit.search.space import blend  # noqa: E402

PROMPTS = bench_search.CHAT_MODEL.parent / "prompts"
PENALTY = 0.05  # KL per refusal beyond measure's


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=150)
    p.add_argument("--work", type=Path, default=HERE / "work" / "search")
    p.add_argument("--candidates", type=Path, default=None)
    p.add_argument("--results", type=Path, default=None, help="default: results-headroom.json")
    p.add_argument("--smoke", action="store_true", help="2 trials each, on 8 + 8 prompts")
    args = p.parse_args(argv)
    if args.smoke:
        args.trials = 2
    elif args.results is None:
        args.results = HERE / "results-headroom.json"
    return args


def free_scales(cfg, trials: int) -> dict:
    """Search 2 (see the module docs); returns measure's and the best trial's test numbers."""
    ready = prepare(cfg)
    judge = open_runner(cfg, ready)
    model = judge.model
    measure = judge(measure_hooks(model, ready))
    writers = [f"{site}:{i}" for site in ("attn", "mlp") for i in range(ready.n_layers)]

    def hooks(layer: float, weights: dict):
        vector, _ = blend(ready.candidates, layer, -1)
        direction = Direction(vector, Path("<headroom>"), "", "single")
        scales = {"embed": 0.0, **weights}
        return ready_hooks(model, ready, direction, sites=["attn", "mlp"], scales=scales)

    def objective(trial):
        layer = trial.suggest_float("layer", 2.0, 3.0)
        weights = {w: trial.suggest_float(w, 0.0, 1.0) for w in writers}
        outcome = judge(hooks(layer, weights))
        trial.set_user_attr("outcome", outcome.to_dict())
        return outcome.kl + PENALTY * max(0, outcome.refused - measure.refused)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=10)
    study = optuna.create_study(sampler=sampler)
    for weight in (1.0, 0.95):
        study.enqueue_trial({"layer": 2.0, **{w: weight for w in writers}})
    study.optimize(objective, n_trials=trials)
    at_measure = [t for t in study.trials if t.user_attrs["outcome"]["refused"] <= measure.refused]
    if not at_measure:  # (a run of a few trials)
        return {"trials": trials, "measure": measure.to_dict(), "best_at_measure_refusal": None}
    best = min(at_measure, key=lambda t: (t.user_attrs["outcome"]["kl"], t.number))
    return {
        "trials": trials,
        "measure": measure.to_dict(),
        "best_at_measure_refusal": {
            "number": best.number,
            "params": best.params,
            **best.user_attrs["outcome"],
        },
        "kl_cut_vs_measure": 1 - best.user_attrs["outcome"]["kl"] / measure.kl,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    folder = args.candidates or args.work / "organism" / "direction"
    if args.smoke and not MeasureFolder(folder).candidates.is_file():
        bench_search.measure_organism(folder, smoke=True)
    if not MeasureFolder(folder).candidates.is_file():
        raise SystemExit(f"{folder}: no measure folder; run benchmarks/bench_search.py first.")
    test = {kind: PROMPTS / f"{kind}-test.jsonl" for kind in ("harmful", "harmless")}
    smoke = ["--smoke"] if args.smoke else []
    search_args = bench_search.parse_args(
        ["--trials", str(args.trials), "--work", str(args.work), *smoke]
    )
    searched = bench_search.organism(search_args, folder, "search-on-test", as_measure=True, **test)
    cfg = bench_search.SearchConfig(
        model=str(bench_search.CHAT_MODEL),
        candidates=folder,
        out=args.work / "organism" / "unused",
        max_new_tokens=search_args.test_tokens,
        **({"n": 8} if args.smoke else {}),
        **test,
    )
    results = {
        "orthoedit search on the test split": {
            "trials": searched["trials"],
            "test": searched["test"],
            "acceptance": searched["acceptance"],
        },
        "free writer weights on the test split": free_scales(cfg, args.trials),
    }
    if args.results is not None:
        args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
