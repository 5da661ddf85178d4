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

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..config import EvalBenchConfig
from ..errors import BadInputError
from ..evals.tasks import (
    lm_eval_quiet,
    offline_mode,
    prepare_shipped_tasks,
    shipped_tasks,
    task_manager,
)
from ..folders import ReportFolder
from ..model.gguf import is_gguf
from ..output import check_target, inputs_of, staged_output
from ..progress import Progress

NOISE_SIGMAS = 2.0


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
    args["dtype"] = _hf_dtype(cfg, model)
    args["use_kernels"] = False  # plain PyTorch layers, offline (as runtime.load_model)
    if is_gguf(model):
        args |= _gguf_args(model)
    return "hf", args


def _hf_dtype(cfg: EvalBenchConfig, model: str) -> str:
    """The dtype lm-eval's hf backend loads a local folder in: ``auto`` as every stage
    resolves it (``runtime.precision``); anything else (a Hub id's auto too) as given."""
    from ..runtime.precision import AUTO, resolve_dtype

    if cfg.dtype != AUTO or is_gguf(model) or not Path(model).is_dir():
        return cfg.dtype
    return resolve_dtype(cfg.dtype, Path(model), cfg.device).dtype


def _gguf_args(model: str) -> dict:
    """lm-eval's ``pretrained`` and ``gguf_file`` for a GGUF (checked whole first, as
    ``runtime.load_model`` checks it)."""
    from ..model.source import pretrained, resolve_model

    where, options = pretrained(resolve_model(model)[0])
    return {"pretrained": str(where), **options}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    dtype = cfg.dtype if cfg.dtype in ("auto", "float32", "bfloat16", "float16") else "float32"
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
    models = {"base": cfg.base, "edited": cfg.edited}
    raw = lm_eval_results(cfg, models, tasks, log, progress, loaded)
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
        "dtype": cfg.dtype if cfg.backend == "vllm" else _hf_dtype(cfg, cfg.base),
        "max_drop": cfg.max_drop,
        "max_drop_task": dict(cfg.max_drop_task),
        "noise": f"|delta| > {NOISE_SIGMAS:g} x combined stderr",
        "n_samples": raw["base"].get("n-samples"),
        "lm_eval_version": raw["base"].get("lm_eval_version"),
        "orthoedit_version": __version__,
    }
    _write(target, raw, rows, settings, f"{cfg.base} vs {cfg.edited}")
    return BenchResult(target, rows, settings)


def lm_eval_results(
    cfg: EvalBenchConfig,
    models: dict[str, str],
    tasks: list[str],
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    loaded: dict | None = None,
) -> dict[str, dict]:
    """lm-eval's results of each model (name: model) on ``tasks``, one after another with
    the same settings (``cfg``'s; its chat template already decided): the base once, however
    many edits are compared with it (``compare``)."""
    import tempfile

    import datasets

    loaded = loaded or {}
    datasets.disable_progress_bars()  # lm-eval's own request bars are the progress shown
    raw = {}
    with tempfile.TemporaryDirectory() as tmp, offline_mode(cfg.offline):
        manager = task_manager(prepare_shipped_tasks(Path(tmp)), tasks)
        for name, model in models.items():
            log(f"lm-eval on the {name} model ({model}): {', '.join(tasks)}")
            with lm_eval_quiet(progress, lambda line: log(f"lm-eval: {line}")):
                raw[name] = run_lm_eval(cfg, model, tasks, manager, loaded.get(name))
    return raw


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
        report = ReportFolder(out)
        report.json.write_text(json.dumps(record, indent=2) + "\n")
        report.md.write_text(bench_markdown(rows, settings))
        bench_png(rows, report.png, title)


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
