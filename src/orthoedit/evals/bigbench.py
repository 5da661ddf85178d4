"""Write ``data/bigbench_lite_mc.jsonl`` from BIG-bench as published on PyPI:
``python -m orthoedit.evals.bigbench`` (about 360 MB downloaded once, under a minute).

Source: the ``bigbench`` 1.0.0 source distribution on PyPI (BIG-bench, Google and the
BIG-bench authors, Apache License 2.0; the task data ships inside the package as
``bigbench/benchmark_tasks/*/task.json``). The archive is checked against its pinned sha256.

What is taken, by rule and not by model:

* the tasks of **BIG-bench Lite** (the benchmark's own 24-task subset, listed in the package as
  ``bigbench/bbseqio/bigbench_lite.py``) whose examples are multiple choice (``target_scores``):
  18 of the 24;
* examples with exactly one best-scored choice (the few with several equally correct answers
  are left out, so accuracy has one gold answer);
* ``PER_TASK`` of them per task, drawn with a fixed seed, so every task weighs the same and the
  file regenerates byte for byte; the rows are shuffled together (seeded), so that lm-eval's
  ``--limit N`` reads a sample of every task.

Each example is formatted zero-shot as BIG-bench formats it: the task prefix, the example's
input prefix and input, its choices (``choice: ...`` lines when the task appends them), then the
output prefix; each choice is scored by its log-likelihood after that text.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tarfile
import tempfile
from pathlib import Path

from .pypi import check, download, write_jsonl

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "bigbench_lite_mc.jsonl"

SDIST = "bigbench-1.0.0.tar.gz"
URL = (
    "https://files.pythonhosted.org/packages/95/f8/"
    "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz"
)
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
LITE_LIST = "bigbench-1.0.0/bigbench/bbseqio/bigbench_lite.py"
TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
PER_TASK = 24
SEED = 20261203

# BIG-bench's formatting defaults (bigbench/api/json_task.py).
DEFAULTS = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


def lite_tasks(source: str) -> list[str]:
    """The names in ``bigbench_lite.py``'s ``bigbench_lite_v1`` list, in its order."""
    start = source.index("[", source.index('"bigbench_lite_v1"'))
    end = source.index("]", start)
    return [
        name.strip().strip("'\"") for name in source[start + 1 : end].split(",") if name.strip()
    ]


def format_example(task: dict, example: dict) -> dict | None:
    """One multiple-choice example as ``{"text", "choices", "gold"}``; ``None`` when it is not
    multiple choice or has no single best choice."""
    scores = example.get("target_scores")
    if not scores:
        return None
    best = max(scores.values())
    if sum(v == best for v in scores.values()) != 1:
        return None
    fmt = {k: task.get(k, v) for k, v in DEFAULTS.items()}
    choices = list(scores)
    text = fmt["task_prefix"] + fmt["example_input_prefix"] + example["input"]
    if fmt["append_choices_to_input"]:
        text += "".join(fmt["choice_prefix"] + c for c in choices)
    text += fmt["example_output_prefix"]
    # lm-eval puts one space between the text and each choice.
    return {
        "text": text.strip(),
        "choices": choices,
        "gold": choices.index(next(c for c, v in scores.items() if v == best)),
    }


def task_rows(name: str, files: dict[str, dict]) -> list[dict]:
    """Every usable example of task ``name`` (its own ``task.json`` or its subtasks')."""
    top = files[f"{TASKS}{name}/task.json"]
    if top.get("examples") is not None:
        parts = [top]
    else:
        prefix = f"{TASKS}{name}/"
        parts = [
            t
            for p, t in sorted(files.items())
            if p.startswith(prefix) and p.count("/") == prefix.count("/") + 1
        ]
    rows = []
    for part in parts:
        for example in part["examples"]:
            row = format_example(part, example)
            if row is not None:
                rows.append({"task": name, **row})
    return rows


def sample(rows: list[dict], name: str) -> list[dict]:
    return random.Random(f"{SEED}:{name}").sample(rows, min(PER_TASK, len(rows)))


def read_archive(path: Path) -> tuple[str, dict[str, dict]]:
    """The BIG-bench Lite list and every ``task.json`` of the archive."""
    lite, files = None, {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.name == LITE_LIST:
                lite = tar.extractfile(member).read().decode()
            elif member.name.startswith(TASKS) and member.name.endswith("/task.json"):
                files[member.name] = json.load(io.TextIOWrapper(tar.extractfile(member), "utf-8"))
    if lite is None:
        raise SystemExit(f"{path}: no {LITE_LIST}; is it {SDIST}?")
    return lite, files


def build(lite_source: str, files: dict[str, dict]) -> list[dict]:
    """The sampled examples of every task, shuffled together: a ``--limit`` of N then reads
    the first N rows, a sample of all tasks rather than the first few tasks."""
    rows = []
    for name in lite_tasks(lite_source):
        usable = task_rows(name, files)
        if usable:
            rows += sample(usable, name)
    random.Random(SEED).shuffle(rows)
    return rows


def main(argv: list[str]) -> None:
    """``python -m orthoedit.evals.bigbench [SDIST] [OUT]``: from a downloaded archive, or
    downloaded from PyPI into a temporary folder."""
    out = Path(argv[1]) if len(argv) > 1 else OUT
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(argv[0]) if argv else download(URL, Path(tmp))
        rows = build(*read_archive(check(archive, SDIST, SHA256)))
    write_jsonl(rows, out)
    tasks = sorted({r["task"] for r in rows})
    print(f"{out}: {len(rows)} examples from {len(tasks)} BIG-bench Lite tasks")


if __name__ == "__main__":
    main(sys.argv[1:])
