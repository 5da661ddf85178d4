"""``make demo``: apply + verify end to end, offline, on a tiny model built on the spot.

Until the project ships its trained model organism, the demo builds a tiny random Llama with
tied embeddings (so the untie policy runs too) and a random direction: it shows the mechanics
and the exactness checks, not a change in refusal behaviour.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from rich.console import Console

from .cli import app
from .direction import save_direction
from .tiny import build_tiny_model


def main(root: str = "demo-out") -> int:
    console = Console()
    base = Path(root)
    shutil.rmtree(base, ignore_errors=True)
    source = build_tiny_model("llama", base / "source", tie=True, hidden=64, n_layers=4)
    gen = torch.Generator().manual_seed(0)
    direction = save_direction(base / "direction.safetensors", torch.randn(64, generator=gen))
    steps = [
        ["apply", str(source), "--direction", str(direction), "--dry-run"],
        ["apply", str(source), "--direction", str(direction), "--out", str(base / "edited")],
        ["verify", str(source), str(base / "edited"), "--report", str(base / "verify.json")],
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
    console.rule("done")
    console.print(f"edited checkpoint: {base / 'edited'} (model card: README.md, plan: plan.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
