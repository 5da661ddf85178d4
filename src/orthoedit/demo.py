"""``make demo``: the whole edit on the shipped model organism, offline, in about a minute.

1. The refusal direction of the organism's chat model: the difference of mean hidden states
   (after block 1, last prompt token) on 128 harmful vs 128 harmless train prompts. This is a
   stand-in for ``orthoedit measure``, which will choose among every layer and position.
2. ``orthoedit apply --dry-run``, ``apply`` and ``verify`` on it.
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
from .direction import save_direction
from .organism import CHAT_MODEL, load_prompts

LAYER = 2  # hidden_states index: the residual stream after block 1


@torch.no_grad()
def difference_of_means(model, tok, layer: int, n: int = 128) -> torch.Tensor:
    """Mean hidden state at the last prompt token, harmful minus harmless (train split)."""

    def mean(kind: str) -> torch.Tensor:
        chats = [[{"role": "user", "content": x["prompt"]}] for x in load_prompts(kind, "train")]
        texts = tok.apply_chat_template(chats[:n], add_generation_prompt=True, tokenize=False)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return model(**enc, output_hidden_states=True).hidden_states[layer][:, -1].mean(0)

    return mean("harmful") - mean("harmless")


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console()
    base = Path(root)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    console.rule("direction: difference of means (organism, train split)")
    tok = AutoTokenizer.from_pretrained(CHAT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(CHAT_MODEL, dtype=torch.float32).eval()
    r = difference_of_means(model, tok, LAYER)
    meta = {"model": "orthoedit.organism chat", "layer": str(LAYER), "position": "-1"}
    direction = save_direction(base / "direction.safetensors", r, meta)
    console.print(f"‖r‖ = {float(r.norm()):.3f} at hidden_states[{LAYER}], saved to {direction}")
    edited = base / "edited"
    steps = [
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
