"""The pipeline from Python: measure -> search -> apply -> verify on the model organism.

The organism (``orthoedit.organism``) is a 4-layer chat model shipped with the package that
learned to refuse, so this runs offline on a CPU in seconds:

    python examples/api.py [OUT]

Each call is one stage of ``orthoedit run``, with the stage's config (the command's options).
The settings here are small on purpose (6 + 6 prompts per trial, 4 trials); a real search
uses the defaults and more trials (docs/guides/search.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from orthoedit.api import (
    ApplyConfig,
    MeasureConfig,
    SearchConfig,
    VerifyConfig,
    apply,
    measure,
    search,
    verify,
)
from orthoedit.organism import CHAT_MODEL


def quiet(line: str) -> None:
    """Where each stage's log lines go (``print`` by default)."""


def main(out: Path, log=quiet):
    model = str(CHAT_MODEL)
    prompts = CHAT_MODEL.parent / "prompts"

    # 1. measure: the candidates at every layer and position. The organism's recipe picks
    # layer 2, position -1; naming it skips the scoring and keeps this example fast.
    measured = measure(
        MeasureConfig(
            model=model,
            out=out / "direction",
            harmful=str(prompts / "harmful-train.jsonl"),
            harmless=str(prompts / "harmless-train.jsonl"),
            filter=False,
            layer=2,
            position=-1,
        ),
        log=log,
    )
    log(f"direction at layer {measured.layer}, position {measured.position}")

    # 2. search: a few trials of the edit (direction, per-layer weights), each judged by the
    # model's answers (failure rate) and its first-token KL on harmless prompts.
    searched = search(
        SearchConfig(
            model=model,
            candidates=measured.out,
            out=out / "search",
            trials=4,
            n=6,
            max_new_tokens=12,
            startup_trials=2,
            max_kl=0.2,
        ),
        log=log,
    )
    chosen = searched.out / "chosen"

    # 3. apply: the chosen edit written as a checkpoint (a streaming pass; no torch). With no
    # trial within the budget, measure's direction is applied to every writer.
    if searched.chosen is not None:
        edit = {"direction": [chosen / "direction.safetensors"], "scales": chosen / "scales.json"}
    else:
        edit = {"direction": [measured.out / "direction.safetensors"]}
    plan, edited = apply(ApplyConfig(model=model, out=out / "edited", **edit))
    log(f"{len(plan.ops)} tensors edited into {edited}")

    # 4. verify: the edited checkpoint against the source model with the plan's hooks.
    report = verify(VerifyConfig(source=model, edited=edited), log=log)
    return report


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="orthoedit-"))
    result = main(where, log=print)
    print(f"max |Δlogit| {result.max_logit_diff:.2e}, mean KL {result.mean_kl:.2e}")
    print("PASS: the edited checkpoint equals the plan at run time" if result.passed else "FAIL")
    sys.exit(0 if result.passed else 1)
