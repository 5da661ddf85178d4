"""The default prompt pools of ``orthoedit measure``: harmful and harmless requests written by
the project (``generate.py``), 520 of each across 10 categories, split train / val / test.

Measurement draws from train (the means) and val (scoring the candidates); test is for
evaluation only.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
KINDS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")


def load_pool(kind: str, split: str | None = None) -> list[dict]:
    """Items ``{"prompt", "category", "split"}`` of one pool, optionally one split."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    lines = (HERE / f"{kind}.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return [item for item in items if split is None or item["split"] == split]
