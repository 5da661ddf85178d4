"""How much of ``orthoedit attribute``'s patched effects is the dtype's rounding: re-patch,
in another dtype, 20 components of a finished ``--patch-all`` run spread over its linear
regime (the components whose patched effect is below 10% of the saturation gap, taken at
even steps of |estimate|), and compare each with the run's estimate and patched effect.

    .venv/bin/python benchmarks/attribute_precision.py ATTRIBUTION_DIR --dtype float32

Uses the run's model, direction, prompts (n, seed) and refusal tokens (its settings); writes
``precision-DTYPE.json`` beside ``attribution.json`` and prints one line per component.
``--smoke FOLDER`` first makes that run in FOLDER: the model organism measured at its
selection on a few prompts, then ``attribute --patch-all`` on 8 + 8 prompts, and re-patches 4
components (seconds; the test suite runs it)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from orthoedit.config import AttributeConfig
from orthoedit.prompts import load_sets
from orthoedit.research.attribute import every_writer, refusal_token_ids
from orthoedit.research.components import _shifts_for, gather, mean_log_odds, writers_of
from orthoedit.runtime.session import Session


def smoke_run(folder: Path) -> None:
    """--smoke: ``attribute --patch-all`` of the organism into ``folder``, along the direction
    measure finds at its selection (layer 2, position -1) on 16 + 16 train prompts."""
    from orthoedit.config import MeasureConfig
    from orthoedit.folders import MeasureFolder
    from orthoedit.measure.candidates import measure
    from orthoedit.organism import CHAT_MODEL

    prompts = CHAT_MODEL.parent / "prompts"
    kinds = {k: str(prompts / f"{k}-train.jsonl") for k in ("harmful", "harmless")}
    measured = folder.with_name(f"{folder.name}-direction")
    given = {"filter": False, "layer": 2, "position": -1, "n_train": 16, "n_val": 8}
    cfg = MeasureConfig(model=str(CHAT_MODEL), out=measured, overwrite=True, **kinds, **given)
    measure(cfg, log=lambda m: None)
    from orthoedit.research.attribute import attribute

    direction = MeasureFolder(measured).direction
    cfg = AttributeConfig(
        model=str(CHAT_MODEL), direction=direction, out=folder, n=8, patch_all=True, **kinds
    )
    attribute(cfg.model_copy(update={"overwrite": True}), log=lambda m: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an attribute --patch-all output folder")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="make a small organism run in RUN first")
    args = p.parse_args()
    if args.smoke:
        smoke_run(args.run)
        args.count = 4
    stored = json.loads((args.run / "attribution.json").read_text())
    settings = stored["settings"]
    gap = abs(stored["harmless_log_odds"] - stored["baseline_log_odds"])
    linear = [c for c in stored["components"] if abs(c["patched"]) < 0.1 * gap]
    linear.sort(key=lambda c: abs(c["estimate"]))
    steps = np.linspace(0, len(linear) - 1, args.count).round().astype(int)
    picked = [linear[i] for i in steps]
    cfg = AttributeConfig(
        model=settings["model"],
        direction=settings["direction"],
        out=args.run / "unused",
        n=settings["counts"]["harmful"],
        seed=settings["seed"],
        dtype=args.dtype,
    )
    folder = Path(settings["model"])
    _, table, checkpoint, _, plan = every_writer(folder, cfg.direction, None)
    session = Session.open(folder, cfg)
    model, pad = session.model, session.pad
    model.requires_grad_(False)
    rows = {k: session.rows(v) for k, v in load_sets(cfg).items()}
    ids = refusal_token_ids(session.tok, cfg.direction, ",".join(settings["refusal_tokens"]), None)
    writers = writers_of(model, table, plan, checkpoint)
    means = {}
    for kind in ("harmful", "harmless"):
        out, _, _ = gather(model, writers, rows[kind], ids, cfg.batch_size, pad, with_grad=False)
        means[kind] = {m: o.double().mean(0) for m, o in out.items()}
    components = {c.name: c for w in writers for c in w.components}
    deltas = {}
    for w in writers:  # as attribute: each component's harmless mean minus its harmful mean
        shift = means["harmless"][w.module] - means["harmful"][w.module]
        for i, c in enumerate(w.components):
            deltas[c.name] = shift[i].float()
    base = mean_log_odds(model, rows["harmful"], ids, cfg.batch_size, pad)
    found = []
    for c in picked:
        shifts = _shifts_for([components[c["name"]]], deltas)
        patched = mean_log_odds(model, rows["harmful"], ids, cfg.batch_size, pad, shifts) - base
        found.append(
            {"name": c["name"], "estimate": c["estimate"], "run": c["patched"], "now": patched}
        )
        line = f"estimate {c['estimate']:+.5f}  run {c['patched']:+.5f}"
        print(f"{c['name']:>14} {line}  {args.dtype} {patched:+.5f}")
    both = [f for f in found if f["run"] and f["now"]]
    summary = {
        key: statistics.median(f["estimate"] / f[key] for f in both) for key in ("run", "now")
    }
    print(
        f"median estimate / patched: run ({settings['dtype']}) {summary['run']:.3f}, "
        f"{args.dtype} {summary['now']:.3f} ({len(both)} components)"
    )
    result = {"dtype": args.dtype, "baseline": base, "components": found, "median_ratio": summary}
    (args.run / f"precision-{args.dtype}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
