"""The model organism: a tiny chat model that learned to refuse, and a tiny guard model.

Both are ordinary Hugging Face folders shipped with the package, trained by
``python -m orthoedit.organism.train`` on synthetic conversations the project wrote (see
``README.md`` beside this file). They exist so that the whole pipeline (measure, apply, verify,
evaluate) can be run and tested offline on a CPU. The chat model has a learned refusal, not the
knowledge or behaviour of a real LLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import KINDS, SPLITS, capability_correct, is_refusal

HERE = Path(__file__).parent
CHAT_MODEL = HERE / "chat"
GUARD_MODEL = HERE / "guard"
PROMPTS = HERE / "prompts"

__all__ = [
    "CHAT_MODEL",
    "GUARD_MODEL",
    "capability_correct",
    "is_refusal",
    "load_prompts",
]


def load_prompts(kind: str, split: str = "test") -> list[dict]:
    """The organism's prompts: ``kind`` in harmful / harmless / capability, ``split`` in
    train / val / test. Each item has ``prompt`` and ``category``; capability items also have
    ``answer``. Measurement uses train and val; every reported number uses test."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    lines = (PROMPTS / f"{kind}-{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
