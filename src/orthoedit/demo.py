"""``make demo``: the whole edit on the shipped model organism, offline, in about a minute.

1. ``orthoedit measure``: difference-of-means candidates at every layer and post-instruction
   token of the organism's chat model (train prompts), scored on validation prompts; the
   lowest bypass within the filters is chosen. ``--max-kl 0.2``: the organism opens helpful
   answers with "sure" or "of" at random, which inflates first-token KL.
2. ``orthoedit apply --dry-run``, ``apply`` and ``verify`` with that direction.
3. Refusal and capability on the held-out test prompts, before and after the edit.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .cli import app
from .organism import CHAT_MODEL, PROMPTS, load_prompts


def scores(folder: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .organism.evaluate import capability_score, refusal_rate

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {
        "harmful requests refused": refusal_rate(model, tok, load_prompts("harmful")),
        "harmless requests refused": refusal_rate(model, tok, load_prompts("harmless")),
        "capability items right": capability_score(model, tok, load_prompts("capability")),
    }


def main(root: str = "demo-out") -> int:
    console = Console()
    base = Path(root)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    direction = base / "direction" / "direction.safetensors"
    edited = base / "edited"
    steps = [
        [
            "measure",
            str(CHAT_MODEL),
            "--out",
            str(direction.parent),
            "--max-kl",
            "0.2",
            "--harmful",
            str(PROMPTS / "harmful-train.jsonl"),
            "--harmless",
            str(PROMPTS / "harmless-train.jsonl"),
        ],
        ["apply", str(CHAT_MODEL), "--direction", str(direction), "--dry-run"],
        ["apply", str(CHAT_MODEL), "--direction", str(direction), "--out", str(edited)],
        ["verify", str(CHAT_MODEL), str(edited), "--report", str(base / "verify.json")],
    ]
    for args in steps:
        console.rule(f"orthoedit {' '.join(args)}")
        try:
            app(args, standalone_mode=False)
        except SystemExit as exit_:  # typer.Exit from a failed check
            return int(exit_.code or 0)
        except Exception as exc:
            console.print(f"[red]{exc}[/red]")
            return 1
    console.rule("behaviour on held-out test prompts")
    before, after = scores(CHAT_MODEL), scores(edited)
    table = Table("", "original", "edited")
    for key in before:
        table.add_row(key, f"{before[key]:.1%}", f"{after[key]:.1%}")
    console.print(table)
    console.print(f"edited checkpoint: {edited} (model card: README.md, plan: plan.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
