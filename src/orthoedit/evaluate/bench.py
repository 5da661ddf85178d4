"""Benchmark regression: lm-eval on the base and the edited model with identical settings.

Both models run through ``lm_eval.simple_evaluate`` with the same tasks, few-shot count,
limit, batch size, seeds and chat-template setting. Every (task, metric) pair is compared:
delta, the combined standard error of the two scores, whether the delta is beyond noise
(more than twice that error) and whether a drop exceeds its threshold. The shipped offline
tasks (``src/orthoedit/evals/``, ``orthoedit.evals``) run when no task is named. A GGUF is
passed to lm-eval's hf backend as its folder and ``gguf_file`` (loaded dequantized, with the
file's tokenizer and chat template, as every stage loads it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..config import EvalBenchConfig
from ..errors import BadInputError
from ..model.gguf import is_gguf
from ..output import check_target, inputs_of, staged_output
from ..progress import Progress, library_output

NOISE_SIGMAS = 2.0


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


def model_spec(cfg: EvalBenchConfig, model: str) -> tuple[str, dict]:
    """lm-eval's model name and ``model_args`` for one of the two models."""
    args: dict = {"pretrained": model, "dtype": cfg.dtype}
    if cfg.backend == "vllm":
        args |= {
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "data_parallel_size": cfg.data_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "seed": cfg.seed,
        }
        return "vllm", args
    args["device"] = cfg.device or _default_device()
    args["use_kernels"] = False  # plain PyTorch layers, offline (as runtime.load_model)
    if is_gguf(model):
        args |= _gguf_args(model)
    return "hf", args


def _gguf_args(model: str) -> dict:
    """lm-eval's ``pretrained`` and ``gguf_file`` for a GGUF (checked whole first, as
    ``runtime.load_model`` checks it)."""
    from ..model.source import pretrained, resolve_model

    where, options = pretrained(resolve_model(model)[0])
    return {"pretrained": str(where), **options}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
def _lm_eval_quiet(progress: Progress | None, log: Callable[[str], None]) -> Iterator[None]:
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


def _causal_lm(model: str) -> bool:
    """Whether lm-eval's hf backend can load ``model`` (it loads through AutoModelForCausalLM,
    which knows no Mistral 3 or LFM2-VL, say). transformers reads causal LMs only from GGUFs."""
    if is_gguf(model):
        return True
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoConfig.from_pretrained(model).model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _load_wrapper(cfg: EvalBenchConfig, model: str):
    """A multimodal checkpoint loaded whole, as every stage loads it, for lm-eval's text
    tasks in process."""
    from ..model.source import resolve_model
    from ..runtime.session import load_model, load_tokenizer

    folder, _ = resolve_model(model)
    dtype = cfg.dtype if cfg.dtype in ("float32", "bfloat16", "float16") else "float32"
    return load_model(folder, dtype, cfg.device), load_tokenizer(folder)


def run_lm_eval(cfg: EvalBenchConfig, model: str, tasks: list[str], manager, loaded=None) -> dict:
    """One ``simple_evaluate`` call; returns its JSON-able results (no per-sample logs).

    ``loaded``: an already loaded ``(model, tokenizer)`` to evaluate in process through
    lm-eval's HF wrapper instead of loading ``model`` again (hf backend only).
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    name, args = model_spec(cfg, model)
    if loaded is None and cfg.backend == "hf" and not _causal_lm(model):
        loaded = _load_wrapper(cfg, model)
    if loaded is not None:
        from lm_eval.models.huggingface import HFLM

        if cfg.backend != "hf":
            raise BadInputError("in-process models need the hf backend.")
        instance, tokenizer = loaded
        name = HFLM(pretrained=instance, tokenizer=tokenizer, batch_size=cfg.batch_size)
        args = None
    limit = cfg.limit
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count; below 1 lm-eval reads a fraction
    results = lm_eval.simple_evaluate(
        model=name,
        model_args=args,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=limit,
        batch_size=cfg.batch_size,
        apply_chat_template=cfg.chat_template,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=cfg.bootstrap_iters,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    if results is None:  # not the main rank of a distributed run
        raise BadInputError("lm-eval returned no results (not the main process?).")
    return json.loads(json.dumps(results, default=handle_non_serializable))


@dataclass
class Row:
    task: str
    metric: str
    filter: str
    base: float
    edited: float
    delta: float
    stderr: float | None  # of the delta: the two runs' stderrs combined
    stderr_base: float | None
    stderr_edited: float | None
    beyond_noise: bool
    higher_is_better: bool | None
    threshold: float | None
    regressed: bool


def compare(base: dict, edited: dict, max_drop: float, per_task: dict[str, float]) -> list[Row]:
    """One row per (task, metric, filter) that both runs report."""
    rows = []
    for task in sorted(base["results"]):
        b, e = base["results"][task], edited["results"].get(task, {})
        better = {**base.get("higher_is_better", {}).get(task, {})}
        for key, value in sorted(b.items()):
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            if key not in e or not isinstance(e[key], int | float):
                continue
            metric, filt = key.split(",", 1)
            se_b, se_e = _stderr(b, metric, filt), _stderr(e, metric, filt)
            stderr = math.hypot(se_b, se_e) if se_b is not None and se_e is not None else None
            delta = float(e[key]) - float(value)
            hib = better.get(metric)
            threshold = per_task.get(task, max_drop) if hib is not None else None
            drop = -delta if hib else delta
            rows.append(
                Row(
                    task=task,
                    metric=metric,
                    filter=filt,
                    base=float(value),
                    edited=float(e[key]),
                    delta=delta,
                    stderr=stderr,
                    stderr_base=se_b,
                    stderr_edited=se_e,
                    beyond_noise=stderr is not None and abs(delta) > NOISE_SIGMAS * stderr,
                    higher_is_better=hib,
                    threshold=threshold,
                    regressed=threshold is not None and drop > threshold,
                )
            )
    return rows


def _stderr(results: dict, metric: str, filt: str) -> float | None:
    value = results.get(f"{metric}_stderr,{filt}")
    try:
        value = float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has none
        return None
    return value if math.isfinite(value) else None


@dataclass
class BenchResult:
    out: Path
    rows: list[Row]
    settings: dict

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regressed]


def _backend(cfg: EvalBenchConfig, log: Callable[[str], None]) -> EvalBenchConfig:
    """``cfg`` with the backend that will run (vLLM falls back to hf where it is not
    installed), its device checked for hf."""
    from ..runtime.vllm_engine import resolved

    cfg = resolved(cfg, log)
    if cfg.backend == "hf":
        from ..runtime.session import check_device

        check_device(cfg.device)
    return cfg


def eval_bench(
    cfg: EvalBenchConfig,
    log: Callable[[str], None] = print,
    loaded: dict | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Run lm-eval on both models, write the report, and return it (regressions included:
    the caller decides the exit code). ``loaded`` may map ``"base"`` / ``"edited"`` to a
    ``(model, tokenizer)`` already in memory, which is evaluated in process (no reload);
    ``cfg.base`` / ``cfg.edited`` then only name it in the report. lm-eval's progress bars
    drive ``progress``; what else it prints goes to ``log`` (``progress.library_output``)."""
    loaded = loaded or {}
    import tempfile

    cfg = _backend(cfg, log)
    target = check_target(cfg.out, inputs_of(cfg), cfg.overwrite)
    _check_inputs(cfg, loaded)
    tasks = list(cfg.tasks or shipped_tasks(default_only=True))
    chat = cfg.chat_template
    if chat is None:
        if "base" in loaded:
            chat = bool(getattr(loaded["base"][1], "chat_template", None))
        else:
            chat = _has_chat_template(cfg.base)
    cfg = cfg.model_copy(update={"chat_template": chat})
    import datasets

    datasets.disable_progress_bars()  # lm-eval's own request bars are the progress shown
    raw = {}
    with tempfile.TemporaryDirectory() as tmp, offline_mode(cfg.offline):
        manager = task_manager(prepare_shipped_tasks(Path(tmp)), tasks)
        for name, model in (("base", cfg.base), ("edited", cfg.edited)):
            log(f"lm-eval on the {name} model ({model}): {', '.join(tasks)}")
            with _lm_eval_quiet(progress, lambda line: log(f"lm-eval: {line}")):
                raw[name] = run_lm_eval(cfg, model, tasks, manager, loaded.get(name))
    rows = compare(raw["base"], raw["edited"], cfg.max_drop, dict(cfg.max_drop_task))
    settings = {
        "base": cfg.base,
        "edited": cfg.edited,
        "tasks": tasks,
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "chat_template": chat,
        "backend": cfg.backend,
        "dtype": cfg.dtype,
        "max_drop": cfg.max_drop,
        "max_drop_task": dict(cfg.max_drop_task),
        "noise": f"|delta| > {NOISE_SIGMAS:g} x combined stderr",
        "n_samples": raw["base"].get("n-samples"),
        "lm_eval_version": raw["base"].get("lm_eval_version"),
        "orthoedit_version": __version__,
    }
    _write(target, raw, rows, settings, f"{cfg.base} vs {cfg.edited}")
    return BenchResult(target, rows, settings)


def _check_inputs(cfg: EvalBenchConfig, loaded: dict) -> None:
    """Local models have a config.json (a GGUF: is whole); per-task thresholds name tasks
    that run."""
    for name, model in (("base", cfg.base), ("edited", cfg.edited)):
        if name in loaded:
            continue
        if is_gguf(model):
            _gguf_args(model)
        elif _looks_local(model) and not (Path(model) / "config.json").is_file():
            raise BadInputError(f"{name} model {model}: no config.json there.")
    unknown = sorted(set(cfg.max_drop_task) - set(cfg.tasks or shipped_tasks(default_only=True)))
    if unknown:
        raise BadInputError(f"--max-drop-task names task(s) not run: {', '.join(unknown)}.")


def _write(target: Path, raw: dict, rows: list, settings: dict, title: str) -> None:
    """lm-eval's raw results and the report (JSON, Markdown, PNG), staged."""
    from ..report import bench_markdown, bench_png

    with staged_output(target) as out:
        (out / "lm_eval").mkdir()
        for name, results in raw.items():
            (out / "lm_eval" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        record = {"settings": settings, "rows": [asdict(r) for r in rows]}
        record["regressions"] = [f"{r.task} {r.metric}" for r in rows if r.regressed]
        (out / "report.json").write_text(json.dumps(record, indent=2) + "\n")
        (out / "report.md").write_text(bench_markdown(rows, settings))
        bench_png(rows, out / "report.png", title)


def _looks_local(model: str) -> bool:
    return Path(model).exists() or model.startswith((".", "/", "~"))


def _has_chat_template(model: str) -> bool:
    from transformers import AutoTokenizer

    try:
        args = _gguf_args(model) if is_gguf(model) else {"pretrained": model}
        tok = AutoTokenizer.from_pretrained(args.pop("pretrained"), **args)
        return bool(getattr(tok, "chat_template", None))
    except Exception:  # lm-eval reports a model it cannot load better than we would here
        return False


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

        with _lm_eval_quiet(None, lambda line: None):  # a search scores under its own bar
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
