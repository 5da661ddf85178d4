"""The lm-eval tasks as every stage runs them: the shipped offline tasks found and prepared,
offline mode, the task index, one task built once and scored in process on a loaded model
(``TaskScorer``: search's damage objective), and lm-eval's output kept under the stage's own
progress. ``eval bench`` runs whole evaluations on top of these."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError
from ..progress import Progress, library_output


def shipped_tasks(default_only: bool = False) -> list[str]:
    """The shipped offline tasks; ``default_only``: those that run when no task is named."""
    from ..evals import TASKS_DIR, by_default, read_task

    tasks = [read_task(p) for p in TASKS_DIR.glob("*.yaml")]
    return sorted(t["task"] for t in tasks if by_default(t) or not default_only)


def prepare_shipped_tasks(folder: Path) -> Path:
    """Copy the shipped task YAMLs into ``folder`` with absolute ``data_files`` (lm-eval reads
    relative ones against the working directory, not the YAML's folder)."""
    from ..evals import TASKS_DIR, copy_task

    for path in sorted(TASKS_DIR.glob("*.yaml")):
        copy_task(path, folder)
    return folder


@contextlib.contextmanager
def offline_mode(enabled: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the run, in the environment and in the
    libraries that read it at import time."""
    if not enabled:
        yield
        return
    import datasets
    import huggingface_hub

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in names}
    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    saved_ds = getattr(datasets.config, "HF_DATASETS_OFFLINE", None)
    os.environ.update(dict.fromkeys(names, "1"))
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
        datasets.config.HF_DATASETS_OFFLINE = saved_ds


def task_manager(include: Path, tasks: list[str]):
    """lm-eval's task index with the shipped tasks added; unknown task names are bad input.

    Indexing lm-eval's own thousands of tasks takes about 15 s, so when every task asked for
    is a shipped one only ``include`` is indexed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=str(include))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BadInputError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (shipped offline tasks: "
            f"{', '.join(shipped_tasks())}; `lm-eval ls tasks` lists the rest)."
        )
    return manager


@contextlib.contextmanager
def lm_eval_quiet(progress: Progress | None, log: Callable[[str], None]) -> Iterator[None]:
    """Around an lm-eval call: its bars and prints captured (``progress.library_output``), and
    no ``git describe``. lm-eval records the git commit of the folder it was started in (the
    user's, not orthoedit's), and outside a checkout git prints its error straight to the
    terminal; orthoedit records its own version and lm-eval's instead."""
    from unittest import mock

    import lm_eval.evaluator as evaluator

    no_git = (
        mock.patch.object(evaluator, "get_git_commit_hash", lambda: None)
        if hasattr(evaluator, "get_git_commit_hash")
        else contextlib.nullcontext()
    )
    with no_git, library_output(progress, log, unnamed="lm-eval"):
        yield


@dataclass
class LoadedTask:
    """One lm-eval task, built (documents loaded) and with the task manager that indexed it
    (without a manager lm-eval indexes its own ~14,000 tasks on every call)."""

    name: str
    task: object
    manager: object
    metric: str | None  # the task's first metric
    higher_is_better: bool


def load_task(name: str) -> LoadedTask:
    """Build one lm-eval task (a shipped offline one, or any lm-eval task); an unknown name
    or a group is bad input."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        manager = task_manager(prepare_shipped_tasks(Path(tmp)), [name])
        with offline_mode(name in shipped_tasks()):  # a shipped task's data is local
            loaded = manager.load([name])
    if loaded["groups"] or list(loaded["tasks"]) != [name]:
        raise BadInputError(f"--eval-task {name} is a group of tasks; name one task.")
    task = loaded["tasks"][name]
    metrics = task.config.metric_list or []
    metric = metrics[0]["metric"] if metrics else None
    better = task.higher_is_better().get(metric, True) if metric else True
    return LoadedTask(name, task, manager, metric, better)


class TaskScorer:
    """One lm-eval task scored in process on a loaded model, as often as needed (``search``'s
    optional damage objective, once per trial): the task is built once (``load_task``), and
    each call evaluates the model as it is at that moment, hooks included. The score is the
    task's first metric (its first filter), oriented so that higher is better."""

    def __init__(self, model, tok, task: LoadedTask | str, limit: int, batch_size: int, seed: int):
        from lm_eval.models.huggingface import HFLM

        self.loaded = load_task(task) if isinstance(task, str) else task
        self.task, self.limit, self.seed = self.loaded.name, limit, seed
        self.lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)

    def __call__(self) -> float:
        import lm_eval

        with lm_eval_quiet(None, lambda line: None):  # a search scores under its own bar
            results = lm_eval.simple_evaluate(
                model=self.lm,
                tasks=[self.loaded.task],
                task_manager=self.loaded.manager,
                limit=self.limit,
                log_samples=False,
                bootstrap_iters=0,
                apply_chat_template=True,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
                verbosity="ERROR",
            )
        scores = results["results"][self.task]
        keys = [k for k in scores if "," in k and "_stderr" not in k]
        metric = self.loaded.metric
        if metric is not None:
            keys = [k for k in keys if k.split(",")[0] == metric] or keys
        if not keys:
            raise BadInputError(f"--eval-task {self.task}: lm-eval reported no metric.")
        self.key = keys[0]
        value = float(scores[self.key])
        return value if self.loaded.higher_is_better else -value
