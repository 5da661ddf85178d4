"""``orthoedit demo`` / ``make demo``: the organism recipe end to end, offline, on a CPU.

It runs the same stages as ``orthoedit run recipes/organism.yaml`` (a test keeps the two
equal): ``measure`` (candidates at every layer and post-instruction token of the organism's
chat model, the lowest bypass within the filters chosen), ``apply``, ``verify``, ``eval bench``
on the organism's capability task and ``eval safety`` with the organism guard as judge. Then
it prints what changed: refusal, the guard's verdicts, capability and first-token KL, with
the paths to the reports. A second run finds every stage up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..folders import RunFolder
from ..organism import CHAT_MODEL, GUARD_MODEL, PROMPTS


def organism_recipe():
    """recipes/organism.yaml, with the organism's paths inside the installed package."""
    from .recipe import Recipe

    return Recipe(
        model=str(CHAT_MODEL),
        measure={
            "harmful": str(PROMPTS / "harmful-train.jsonl"),
            "harmless": str(PROMPTS / "harmless-train.jsonl"),
            "max_kl": 0.2,
        },
        edit={},
        verify={},
        bench={"tasks": ["organism_capability"], "max_drop": 0.02, "dtype": "float32",
               "offline": True},
        safety={"harmful": "organism", "harmless": "organism", "judge": f"hf:{GUARD_MODEL}"},
        kl={"prompts": str(PROMPTS / "harmless-test.jsonl"), "dtype": "float32"},
    )  # fmt: skip


def scores(folder: Path) -> dict[str, float]:
    """The organism's own measures (its refusal markers and answer checker) on a model."""
    from ..organism import load_prompts
    from ..organism.evaluate import capability_score, refusal_rate
    from ..runtime.session import load_model, load_tokenizer

    tok, model = load_tokenizer(folder), load_model(folder)
    return {
        "harmful requests refused": refusal_rate(model, tok, load_prompts("harmful")),
        "harmless requests refused": refusal_rate(model, tok, load_prompts("harmless")),
        "capability items right": capability_score(model, tok, load_prompts("capability")),
    }


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def summary_table(out: Path, state: dict, kl: float | None) -> Table:
    stages = state["stages"]
    safety = stages["safety"]["summary"]
    (row,) = [r for r in _bench_rows(out) if r["task"] == "organism_capability"]
    table = Table("on held-out test prompts", "original", "edited", title="what the edit changed")
    for kind, label in (
        ("harmful", "harmful requests refused"),
        ("harmless", "harmless requests refused"),
    ):
        table.add_row(
            label,
            _rate(safety["base"][kind]["overall"]["refusal"]),
            _rate(safety["model"][kind]["overall"]["refusal"]),
        )
    table.add_row(
        "harmful answers the guard calls unsafe",
        _rate(safety["base"]["harmful"]["overall"]["unsafe"]),
        _rate(safety["model"]["harmful"]["overall"]["unsafe"]),
    )
    table.add_row("capability (organism_capability)", _rate(row["base"]), _rate(row["edited"]))
    if kl is not None:
        table.add_row("first-token KL on harmless prompts", "", f"{kl:.3g}")
    return table


def _bench_rows(out: Path) -> list[dict]:
    import json

    return json.loads(RunFolder(out).bench.json.read_text())["rows"]


def main(root: str = "demo-out") -> int:
    from ..config import EvalKLConfig
    from ..errors import OrthoeditError
    from ..evaluate.kl import eval_kl
    from .run import run_recipe

    console = Console()
    out = Path(root).resolve()
    run = RunFolder(out)
    log = lambda m: console.print(f"[dim]{m}[/dim]", highlight=False)  # noqa: E731
    try:
        state = run_recipe(
            organism_recipe(), Path.cwd(), out, source="organism (built in)", log=log
        )
        harmless = str(PROMPTS / "harmless-test.jsonl")
        kl_cfg = EvalKLConfig(base=str(CHAT_MODEL), edited=str(run.model), prompts=harmless)
        kl = eval_kl(kl_cfg, log=log)
    except OrthoeditError as err:
        console.print(f"[red]error:[/red] {err}")
        return err.exit_code
    console.print(summary_table(out, state, kl.first_token_kl))
    for what, path in (
        ("edited checkpoint", run.model),
        ("direction and score plot", run.direction.scores_png),
        ("verify report", run.verify),
        ("benchmark report", run.bench.md),
        ("safety report", run.safety.md),
        ("run record", run.record),
    ):
        console.print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
