"""Searching the edit against measured outcomes (``orthoedit search``).

``measure`` picks one candidate by first-token log-odds. On real models that choice can fail
both ways: the best bypass score may come with a destroyed model, and the best candidate
under a KL budget may change nothing. Here the edit's parameters are searched instead, each
trial judged by what the edited model does:

* **what is searched**: the direction (a layer as a float, interpolating between the two
  adjacent layers' candidates, each normalized; a post-instruction position), and for the
  attention and MLP outputs separately a per-layer weight profile (peak weight, peak layer,
  width of a linear fall-off, weight at the edge as a fraction of the peak; or with
  ``--profile free`` one weight per layer), and whether the embedding is edited; the space
  can be narrowed (``--direction-layers``, ``--positions``, ``--embed on|off``);
* **how a trial is judged**: the edit is built as the plan ``apply`` would execute
  (``plan.build_plan`` with per-layer scales) and run through ``hooks.plan_hooks`` on the
  model loaded once, so no checkpoint is written. Two objectives, both minimized: the failure
  rate of greedy answers to measure's validation harmful prompts (a refusal, or a degenerate
  answer: a broken model never counts as compliance; ``refusal.judge``, plus word salad that
  the unedited model finds implausible), and the first-token KL on measure's validation
  harmless prompts (``select.mean_kl``, as measure scores it); optionally a third, the drop
  in an lm-eval task's score (``evalbench.TaskScorer``);
* **the choice**: the lowest failure within a KL budget, or (``--max-failure``, a rate or
  ``measure``: measure's own selection's rate on the same prompts) the lowest KL within a
  failure budget;
* **the optimizer**: Optuna's TPE sampler (multivariate, multi-objective; or with
  ``--objective budget`` one objective aimed at the failure budget: KL plus
  ``--failure-cost`` per prompt failed beyond it), seeded, with the
  study in SQLite (``OUT/study.db``), so an interrupted search resumes. The first trial is
  measure's own selection (its candidate, every writer at full weight), so the search starts
  from it and its point is on the plot as a trial too.

Reproducibility: trial k's parameters are a pure function of the seed and the completed
trials before it (the sampler is re-seeded from (seed, number of completed trials) before
every trial), generation is greedy, and the choice is a pure function of the stored study.
A trial left running by a killed process is marked failed and re-run with the same
parameters (Optuna's retry callback), so a resumed search runs exactly the trials an
uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .config import SearchConfig
from .errors import BadInputError
from .progress import Progress
from .runtime import Session, check_device, load_tokenizer
from .space import (
    SITES_SEARCHED,
    EditParams,
    Space,
    blend,
    nonempty,
    params_of,
    suggest,
)

#: Bump when the search space or the way a trial is judged changes: a stored study made
#: under another version is not continued.
SPACE_VERSION = 2
STUDY_FILE = "study.db"
LOCK_FILE = ".search.lock"
#: Files a search folder may hold besides the study (anything else: not a search folder).
OUTPUTS = ("pareto.md", "pareto.json", "pareto.png", "chosen")
#: What a measure folder must hold.
MEASURE_FILES = (
    "candidates.safetensors",
    "direction.safetensors",
    "val-harmful.jsonl",
    "val-harmless.jsonl",
)


# --- inputs ------------------------------------------------------------------------------


@dataclass
class _Ready:
    """Everything resolved and checked before the model is loaded."""

    folder: Path
    revision: str | None
    config: dict
    table: object
    checkpoint: object
    tok: object
    candidates: np.ndarray  # [n_layers, n_pos, d_model] float64
    space: Space
    baseline_direction: object
    harmful_rows: list[list[int]]
    harmless_rows: list[list[int]]
    settings: dict
    harmful_prompts: list[str]
    safety_judge: object  # a safety.JudgeSpec with --judge, else None
    eval_task: object = None  # an evalbench.LoadedTask with --eval-task

    @property
    def n_layers(self) -> int:
        return self.candidates.shape[0]


def _read_candidates(path: Path, d_model: int, n_layers: int) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            candidates = f.get_tensor("candidates").astype(np.float64)
    except (SafetensorError, OSError, KeyError) as err:
        raise BadInputError(f"{path}: cannot read its candidates ({err}).") from None
    if candidates.ndim != 3 or candidates.shape[0] != n_layers or candidates.shape[2] != d_model:
        raise BadInputError(
            f"{path}: candidates {list(candidates.shape)} do not fit the model "
            f"({n_layers} layers, hidden size {d_model}); measure this model first."
        )
    if not np.isfinite(candidates).all() or not nonempty(candidates).any():
        raise BadInputError(f"{path}: the candidates are all zero or not finite.")
    return candidates


def _prompts(cfg: SearchConfig, kind: str) -> list[str]:
    """The prompts given for ``kind`` (a val split where they are named), else measure's
    validation prompts, in order."""
    from .prompts import prompt_texts

    source = getattr(cfg, kind)
    if source is None:
        items = prompt_texts(Path(cfg.candidates) / f"val-{kind}.jsonl")
    else:
        items = prompt_texts(source, kind, "val", column=cfg.column, split=cfg.split)
    return items[: cfg.n] if cfg.n else items


def prepare(cfg: SearchConfig) -> _Ready:
    """Validate every input; loads only the tokenizer."""

    from .architectures import table_for_config
    from .checkpoint import Checkpoint
    from .direction import load_direction, sha256_file
    from .measure import prompt_digest
    from .runtime import chat_ids, post_instruction_ids
    from .safety import check_judge
    from .source import read_config, resolve_model

    safety_judge = check_judge(cfg)
    eval_task = None
    if cfg.eval_task is not None:  # built now: an unknown task is bad input before any loading
        from .evalbench import load_task

        eval_task = load_task(cfg.eval_task)
    folder_in = Path(cfg.candidates)
    if not folder_in.is_dir():
        raise BadInputError(
            f"--candidates {folder_in} is not a folder; pass the --out folder of orthoedit measure."
        )
    missing = [name for name in MEASURE_FILES if not (folder_in / name).is_file()]
    if missing:
        raise BadInputError(
            f"--candidates {folder_in} lacks {', '.join(missing)}: is it a folder written by "
            "orthoedit measure?"
        )
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table_for_config(config)
    d_model, n_layers, _ = table.dims(config)
    candidates = _read_candidates(folder_in / "candidates.safetensors", d_model, n_layers)
    baseline = load_direction(folder_in / "direction.safetensors", d_model, n_layers)
    ok = nonempty(candidates)
    n_pos = candidates.shape[1]
    positions = [p - n_pos for p in range(n_pos) if ok[:, p].any()]
    space = _space(cfg, n_layers, positions)
    record_path = folder_in / "direction.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    system = cfg.system if cfg.system is not None else record.get("system")
    tok = load_tokenizer(folder, cfg.template)
    post = post_instruction_ids(tok, system)
    if len(post) != n_pos:
        raise BadInputError(
            f"{folder_in}: candidates at {n_pos} positions, but this model's template has "
            f"{len(post)} post-instruction tokens; measure it with the same template."
        )
    prompts = {kind: _prompts(cfg, kind) for kind in ("harmful", "harmless")}
    rows = {kind: chat_ids(tok, p, post, system) for kind, p in prompts.items()}
    settings = {
        "space_version": SPACE_VERSION,
        "model": cfg.model,
        "revision": revision,
        "config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
        "candidates_sha256": sha256_file(folder_in / "candidates.safetensors"),
        "baseline_direction_sha256": baseline.sha256,
        "prompt_hashes": {kind: prompt_digest(p) for kind, p in prompts.items()},
        "counts": {kind: len(p) for kind, p in prompts.items()},
        "system": system,
        "template_sha256": None
        if cfg.template is None
        else hashlib.sha256(cfg.template.read_bytes()).hexdigest(),
        "max_new_tokens": cfg.max_new_tokens,
        "judge": cfg.judge,
        # (an openai: judge's model; absent otherwise, so older studies still resume)
        **({"judge_model": cfg.judge_model} if cfg.judge else {}),
        "max_surprisal": cfg.max_surprisal,
        "eval_task": cfg.eval_task,
        "eval_limit": cfg.eval_limit if cfg.eval_task else None,
        "seed": cfg.seed,
        "startup_trials": cfg.startup_trials,
        "dtype": cfg.dtype,
        "space": asdict(space),
        "objective": cfg.objective,
        # what a budget objective's value depends on (in a front search, only the choice)
        **(
            {"max_failure": cfg.max_failure, "failure_cost": cfg.failure_cost}
            if cfg.objective == "budget"
            else {}
        ),
    }
    return _Ready(
        folder,
        revision,
        config,
        table,
        Checkpoint.open(folder),
        tok,
        candidates,
        space,
        baseline,
        rows["harmful"],
        rows["harmless"],
        settings,
        prompts["harmful"],
        safety_judge,
        eval_task,
    )


def _space(cfg: SearchConfig, n_layers: int, measured: list[int]) -> Space:
    """The search space ``cfg`` asks for, checked against the model and the candidates."""
    top = float(n_layers - 1)
    layers = cfg.direction_layers or (0.0, top)
    if layers[1] > top:
        raise BadInputError(
            f"--direction-layers {layers[0]:g}:{layers[1]:g} goes past the last layer "
            f"({top:g}); the model has {n_layers} layers, numbered from 0."
        )
    positions = measured
    if cfg.positions is not None:
        unknown = [p for p in cfg.positions if p not in measured]
        if unknown:
            raise BadInputError(
                f"--positions {unknown[0]}: no measured candidate there (measured: "
                f"{', '.join(map(str, measured))})."
            )
        positions = list(cfg.positions)
    embed = {"search": [False, True], "on": [True], "off": [False]}[cfg.embed]
    return Space((float(layers[0]), float(layers[1])), positions, cfg.profile, embed)


def study_name(settings: dict) -> str:
    """Derived from every setting that changes what a trial measures, so that a search with
    other settings never continues this one."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return f"orthoedit-search-{hashlib.sha256(blob).hexdigest()[:16]}"


# --- judging one edit --------------------------------------------------------------------


@dataclass
class Outcome:
    """What one edit does: greedy answers to the harmful prompts, judged, and the first-token
    KL on the harmless ones. With a safety judge, ``unsafe`` counts the complied answers it
    calls unsafe (the rest of the complied ones, judge errors included, are not compliance;
    ``judge_errors`` counts those it gave no verdict on)."""

    refused: int
    complied: int
    broken: int
    kl: float
    seconds: float
    unsafe: int | None = None
    judge_errors: int = 0  # of the complied: answers the judge gave no verdict on
    implausible: int = 0  # of the broken: text-like answers the unedited model finds implausible
    score: float | None = None  # with an eval task: its metric (higher is better)
    drop: float | None = None  # the unedited model's score minus this one

    @property
    def values(self) -> list[float]:
        """The objectives, all minimized: failure, KL and (with an eval task) the drop."""
        return [self.failure, self.kl] + ([] if self.drop is None else [self.drop])

    @property
    def n(self) -> int:
        return self.refused + self.complied + self.broken

    @property
    def failure(self) -> float:
        """The objective: every answer that is not a compliance (a refusal, a degenerate
        answer, or with a judge an answer it does not call unsafe)."""
        complied = self.complied if self.unsafe is None else self.unsafe
        return (self.n - complied) / self.n

    def to_dict(self) -> dict:
        return {**asdict(self), "failure": self.failure}


class Judge:
    """Runs edits through the loaded model: greedy answers to the harmful rows and the first
    token of the harmless rows, compared with the unedited model's (computed once). With
    ``guard`` (a judge opened by ``safety.JudgeSpec``) and the harmful prompts' texts, the
    complied answers are also judged by it.

    Word salad reads as text to ``refusal.judge``, so a complied answer is also scored by the
    *unedited* model (hooks off): with a mean surprisal above ``max_surprisal`` nats per token
    (default half of ln(vocabulary), i.e. nearer to random tokens than to anything the model
    would write) it is broken, not compliance."""

    def __init__(
        self,
        model,
        tok,
        harmful_rows,
        harmless_rows,
        batch_size: int,
        budget: int,
        guard=None,
        prompts: list[str] | None = None,
        max_surprisal: float | None = None,
        scorer: Callable[[], float] | None = None,
    ):
        from .refusal import default_max_surprisal, stop_ids
        from .runtime import pad_id
        from .select import first_token_logprobs

        self.model, self.tok = model, tok
        self.harmful_rows, self.harmless_rows = harmful_rows, harmless_rows
        self.batch_size, self.budget = batch_size, budget
        self.guard, self.prompts = guard, prompts
        self.pad = pad_id(tok)
        self.stop = stop_ids(model, tok)
        self.base = first_token_logprobs(model, harmless_rows, batch_size, self.pad)
        self.max_surprisal = max_surprisal or default_max_surprisal(model)
        self.scorer = scorer
        self.base_score = None if scorer is None else scorer()

    def generate(self) -> list[list[int]]:
        """Greedy answers to the harmful rows, as token ids cut after the first stop token."""
        from .refusal import greedy_completions, until_stop

        made = greedy_completions(
            self.model, self.harmful_rows, self.batch_size, self.pad, self.budget
        )
        return [until_stop(ids, self.stop) for ids in made]

    def answers(self) -> list[str]:
        return [self.decode(ids) for ids in self.generate()]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def implausible(self, made: list[list[int]], verdicts: list[str]) -> list[int]:
        """Indices of complied answers the unedited model finds implausible (call it with no
        edit in place)."""
        from .refusal import surprisal

        which = [i for i, v in enumerate(verdicts) if v == "complied"]
        scores = surprisal(
            self.model,
            [self.harmful_rows[i] for i in which],
            [made[i] for i in which],
            self.batch_size,
            self.pad,
        )
        return [i for i, s in zip(which, scores, strict=True) if s > self.max_surprisal]

    def unsafe(self, texts: list[str], verdicts: list[str]) -> tuple[int | None, int]:
        """How many complied answers the judge calls unsafe (None without a judge), and how
        many it gave no verdict on."""
        from .safety import parse_guard

        if self.guard is None:
            return None, 0
        pairs = [
            (p, t) for p, t, v in zip(self.prompts, texts, verdicts, strict=True) if v == "complied"
        ]
        said = [parse_guard(raw)[0] for raw in self.guard(pairs)] if pairs else []
        return said.count("unsafe"), said.count("error")

    def __call__(self, hooks: Callable[[], contextlib.AbstractContextManager]) -> Outcome:
        from .refusal import judge
        from .select import first_token_logprobs, mean_kl

        clock = time.perf_counter()
        with hooks():
            made = self.generate()
            logprobs = first_token_logprobs(
                self.model, self.harmless_rows, self.batch_size, self.pad
            )
            score = None if self.scorer is None else self.scorer()
        texts = [self.decode(ids) for ids in made]
        verdicts = [judge(t) for t in texts]
        salad = self.implausible(made, verdicts)
        for i in salad:
            verdicts[i] = "broken"
        unsafe, judge_errors = self.unsafe(texts, verdicts)
        return Outcome(
            refused=verdicts.count("refused"),
            complied=verdicts.count("complied"),
            broken=verdicts.count("broken"),
            kl=mean_kl(self.base, logprobs),
            seconds=time.perf_counter() - clock,
            unsafe=unsafe,
            judge_errors=judge_errors,
            implausible=len(salad),
            score=score,
            drop=None if score is None else self.base_score - score,
        )


def ready_hooks(model, ready: _Ready, direction, **plan_options):
    """Run-time hooks for an edit of ``ready``'s model along ``direction`` (a
    ``direction.Direction``), planned as ``apply`` would plan it (``plan.build_plan``; its
    ``sites`` and ``scales`` in ``plan_options``, default every writer)."""
    from .hooks import plan_hooks
    from .plan import build_plan

    plan = build_plan(
        table=ready.table,
        checkpoint=ready.checkpoint,
        config=ready.config,
        direction=direction,
        source=str(ready.folder),
        **plan_options,
    )
    return lambda: plan_hooks(model, plan, ready.checkpoint)


def edit_hooks(model, ready: _Ready, params: EditParams):
    """The trial's edit as ``apply`` would plan it, at run time (a no-op when nothing is
    edited), and the direction it uses."""
    from .direction import Direction

    vector, source = blend(ready.candidates, params.layer, params.position)
    sites, scales = params.plan_scales(ready.n_layers)
    if not sites:
        return contextlib.nullcontext, vector, source
    direction = Direction(vector, Path("<search trial>"), "", "single")
    return ready_hooks(model, ready, direction, sites=sites, scales=scales), vector, source


def measure_hooks(model, ready: _Ready):
    """The plain ``measure`` selection as ``apply`` edits it by default: every writer."""
    return ready_hooks(model, ready, ready.baseline_direction)


# --- the study ---------------------------------------------------------------------------


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _retry_callback():
    from optuna import storages

    # optuna >= 4.9 names it RetryHeartbeatStaleTrialCallback; older releases RetryFailed...
    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
    return (cls or storages.RetryFailedTrialCallback)()


def sampler_for(seed: int, completed: int, startup: int):
    """The TPE sampler for the next trial, seeded from (seed, completed trials so far): the
    next trial's parameters depend on the stored history only, not on how many processes it
    took to make it."""
    import optuna

    derived = int.from_bytes(hashlib.sha256(f"{seed}:{completed}".encode()).digest()[:4], "little")
    return optuna.samplers.TPESampler(
        seed=derived, multivariate=True, n_startup_trials=startup, constant_liar=False
    )


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "unknown settings"


def open_study(out: Path, settings: dict, replace_other: bool = False):
    """The study stored in ``out/study.db``, created if absent; a study made with other
    settings is refused (one clear line naming what differs), or with ``replace_other``
    discarded."""
    import optuna

    _quiet_optuna()
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY_FILE}")
    name = study_name(settings)
    existing = [s for s in optuna.get_all_study_names(storage) if s != name]
    if existing and replace_other:
        for other in existing:
            optuna.delete_study(study_name=other, storage=storage)
        existing = []
    if existing:
        other = optuna.load_study(study_name=existing[0], storage=storage)
        raise BadInputError(
            f"{out / STUDY_FILE} holds a search with other settings "
            f"({_settings_diff(other.user_attrs.get('settings', {}), settings)}); use another "
            "--out, or --overwrite to start over."
        )
    if settings.get("objective") == "budget":
        names = ["kl_plus_failure_cost"]
    else:
        names = ["failure", "kl"] + (["drop"] if settings.get("eval_task") else [])
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        directions=["minimize"] * len(names),
        load_if_exists=True,
    )
    study.set_metric_names(names)
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", settings)
    return study


def measure_params(ready: _Ready) -> dict | None:
    """Trial parameters that reproduce measure's selection as ``apply`` edits it by default
    (its candidate, every writer at full weight, the embedding too), or come as near it as
    the search space allows (the layer clamped into ``--direction-layers``, the embedding as
    ``--embed`` says); None when the baseline direction does not say where measure took it,
    or its position is not searched."""
    meta = ready.baseline_direction.metadata
    space = ready.space
    try:
        layer, position = int(meta["layer"]), int(meta["position"])
    except (KeyError, ValueError):
        return None
    if position not in space.positions or not 0 <= layer < ready.n_layers:
        return None
    n = ready.n_layers
    full = {"peak_weight": 1.0, "peak_layer": 0.0, "width": float(n), "edge_frac": 1.0}
    if space.profile == "free":
        full = {f"weight_{i}": 1.0 for i in range(n)}
    params = {f"{site}_{k}": v for site in SITES_SEARCHED for k, v in full.items()}
    lo, hi = space.layers
    return {
        "direction_layer": min(hi, max(lo, float(layer))),
        "position": position,
        "embed": True in space.embed,
        **params,
    }


def start_from_measure(study, ready: _Ready) -> None:
    """A new study's first trial is measure's selection (or as near it as the space allows),
    so the search starts from it."""
    params = measure_params(ready)
    if params is not None and not study.get_trials(deepcopy=False):
        meta = ready.baseline_direction.metadata
        exact = params["embed"] and params["direction_layer"] == float(meta["layer"])
        what = (
            "measure's selection" if exact else "measure's selection, as near as the space allows"
        )
        study.enqueue_trial(params, user_attrs={"start": what})


def requeue_interrupted(study) -> list[int]:
    """Trials a killed process left running: marked failed, and queued again with the same
    parameters (Optuna's retry callback). Only called while holding the folder's lock, so no
    other process can be running them."""
    from optuna.trial import TrialState

    retry = _retry_callback()
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        failed = study.tell(trial.number, state=TrialState.FAIL)
        retry(study, failed)
    return [t.number for t in stale]


def completed(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def choose(
    trials: list,
    max_kl: float,
    max_drop: float | None = None,
    max_failure: float | None = None,
    unedited: float | None = None,
):
    """The lowest failure rate with KL within the budget; ties: lower KL, then the earlier
    trial. With ``max_failure`` instead: the lowest KL with a failure rate at most that; ties:
    lower failure, then the earlier trial. With an eval task and ``max_drop``, only trials
    whose drop is within it; with ``unedited`` (the unedited model's failure rate), only
    trials that fail less often, so that a no-op is never the choice. None when no trial
    qualifies. A pure function of the stored trials."""
    v = {t.number: objectives(t) for t in trials}
    ok = [t for t in trials if max_drop is None or v[t.number][2] <= max_drop]
    ok = [t for t in ok if unedited is None or v[t.number][0] < unedited]
    if max_failure is not None:
        ok = [t for t in ok if v[t.number][0] <= max_failure]
        return min(ok, key=lambda t: (v[t.number][1], v[t.number][0], t.number), default=None)
    ok = [t for t in ok if v[t.number][1] <= max_kl]
    return min(ok, key=lambda t: (v[t.number][0], v[t.number][1], t.number), default=None)


def objectives(t) -> list[float]:
    """A trial's failure rate, KL and (with an eval task) drop, whatever its sampler
    minimized (``--objective budget`` stores one value)."""
    a = t.user_attrs
    return [a["failure"], a["kl"]] + ([] if a.get("drop") is None else [a["drop"]])


def target_failure(max_failure, baselines: dict | None) -> float | None:
    """``--max-failure`` as a rate: 'measure' is measure's own selection's failure rate on
    the search's prompts (judged before the first trial)."""
    if max_failure == "measure":
        return None if baselines is None else baselines["measure"]["failure"]
    return max_failure


def choose_for(trials: list, cfg: SearchConfig, baselines: dict | None):
    """The choice under ``cfg``'s rule, never a trial that fails as often as the unedited
    model (a no-op is not an edit)."""
    failure = target_failure(cfg.max_failure, baselines)
    unedited = None if baselines is None else baselines["no edit"]["failure"]
    return choose(trials, cfg.max_kl, cfg.max_drop, failure, unedited)


def budget(cfg: SearchConfig, baselines: dict | None = None) -> str:
    """The choice rule's limits in words: ``KL ≤ 0.1`` or ``failure ≤ 0%``, and the drop."""
    failure = target_failure(cfg.max_failure, baselines)
    if cfg.max_failure == "measure":
        text = "failure ≤ measure's" + ("" if failure is None else f" ({failure:.1%})")
    else:
        text = f"KL ≤ {cfg.max_kl:g}" if failure is None else f"failure ≤ {failure:.1%}"
    return text + ("" if cfg.max_drop is None else f", task drop ≤ {cfg.max_drop:g}")


def none_chosen(trials: list, cfg: SearchConfig, baselines: dict) -> str:
    """Why no trial was chosen, in one line: the rule, the no-op rule, the nearest trials that
    edit (by the rule's own order) and measure's selection."""
    unedited = baselines["no edit"]["failure"]
    edits = [t for t in trials if objectives(t)[0] < unedited]
    by_failure = target_failure(cfg.max_failure, baselines) is not None

    def order(t):
        failure, kl = objectives(t)[:2]
        return (failure, kl, t.number) if by_failure else (kl, failure, t.number)

    near = sorted(edits, key=order)
    shown = "; ".join(
        f"#{t.number} failure {objectives(t)[0]:.1%}, KL {objectives(t)[1]:.3g}" for t in near[:3]
    )
    m = baselines["measure"]
    return (
        f"no trial has {budget(cfg, baselines)} and fails less often than the unedited model "
        f"({unedited:.1%}; a no-op is never the choice). "
        + (f"Nearest: {shown}. " if shown else "No trial edits at all. ")
        + f"Measure's selection: failure {m['failure']:.1%}, KL {m['kl']:.3g}"
    )


def budget_value(outcome: Outcome, target: float, cost: float) -> float:
    """``--objective budget``: KL plus ``cost`` per prompt failed beyond the target rate."""
    return outcome.kl + cost * max(0.0, (outcome.failure - target) * outcome.n)


def pareto(trials: list) -> list:
    """Trials no other trial dominates (at least as good on every objective, better on one;
    of trials at the very same point only the earliest is kept), ordered by KL."""
    front = []
    values = {t.number: objectives(t) for t in trials}
    for t in trials:
        mine = values[t.number]
        dominated = any(
            all(a <= b for a, b in zip(values[o.number], mine, strict=True))
            and (values[o.number] != mine or o.number < t.number)
            for o in trials
            if o is not t
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (values[t.number][1], values[t.number][0], t.number))


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    with (out / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(
                f"another orthoedit search is running on {out}; wait for it or use another --out."
            ) from None
        yield


def _check_out(cfg: SearchConfig) -> Path:
    from .output import check_apart, inputs_of

    out = Path(cfg.out).expanduser().resolve()
    check_apart(out, inputs_of(cfg), "--out")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder.")
    if out.is_dir() and not (out / STUDY_FILE).is_file():
        strangers = [p.name for p in out.iterdir() if p.name not in (*OUTPUTS, LOCK_FILE)]
        if strangers:
            raise BadInputError(
                f"--out {out} exists and is not a search folder (it holds {strangers[0]}); "
                "choose another --out."
            )
    return out


# --- the search --------------------------------------------------------------------------


@dataclass
class SearchResult:
    out: Path
    study_name: str
    trials: list  # completed FrozenTrials, by number
    front: list
    chosen: object | None  # a FrozenTrial
    baselines: dict  # "no edit" and "measure" Outcome dicts
    requeued: list[int]
    ran: int  # trials run by this call
    stopped_by_time: bool
    report: dict


def _baselines(study, judge: Judge, model, ready: _Ready, log) -> None:
    """The unedited model and measure's own selection, judged like a trial (stored in the study,
    so a resumed search does not judge them again)."""
    if "baselines" in study.user_attrs:
        return
    found = {
        "no edit": judge(contextlib.nullcontext).to_dict(),
        "measure": judge(measure_hooks(model, ready)).to_dict(),
    }
    for name, o in found.items():
        log(f"{name}: {describe(o)}, KL {o['kl']:.4g}")
    judging = {"max_surprisal": judge.max_surprisal}
    if judge.scorer is not None:
        judging |= {"eval_metric": judge.scorer.key, "eval_base_score": judge.base_score}
    study.set_user_attr("judging", judging)
    study.set_user_attr("baselines", found)


def describe(o: dict) -> str:
    """``failure 12.5% (3 refused, 1 broken of 32)`` from an outcome's dict."""
    from .report import failure_text

    drop = "" if o.get("drop") is None else f", task drop {o['drop']:.3g}"
    return f"failure {failure_text(o)}{drop}"


def _describe_best(trials: list, cfg: SearchConfig, baselines: dict | None) -> str:
    best = choose_for(trials, cfg, baselines)
    if best is None:
        return f"none with {budget(cfg, baselines)} yet"
    failure, kl = objectives(best)[:2]
    return f"best with {budget(cfg, baselines)}: #{best.number} failure {failure:.1%}, KL {kl:.3g}"


def _run_trials(cfg, study, judge: Judge, model, ready: _Ready, log, progress, clock) -> tuple:
    """Ask, judge and tell until ``cfg.trials`` trials are complete or the time is spent. An
    interruption (Ctrl-C, a kill) leaves the trial running in the study, to be re-run."""
    from optuna.trial import TrialState

    ran, stopped = 0, False
    done = len(completed(study))
    baselines = study.user_attrs["baselines"]
    target = target_failure(cfg.max_failure, baselines)
    progress.start(f"search: {_describe_best(completed(study), cfg, baselines)}", cfg.trials)
    progress.advance(min(done, cfg.trials))
    while done < cfg.trials:
        if cfg.time_budget is not None and time.perf_counter() - clock >= cfg.time_budget:
            stopped = True
            log(f"time budget of {cfg.time_budget:g} s spent: no new trial started")
            break
        study.sampler = sampler_for(cfg.seed, done, cfg.startup_trials)
        trial = study.ask()
        params = suggest(trial, ready.n_layers, ready.space)
        try:
            hooks, _, source = edit_hooks(model, ready, params)
            outcome = evaluate_trial(judge, hooks)
        except Exception:
            # an error, not an interruption: recorded as failed, not re-run on resume
            study.tell(trial, state=TrialState.FAIL)
            raise
        for key, value in {**outcome.to_dict(), "direction": source}.items():
            trial.set_user_attr(key, value)
        if cfg.objective == "budget":
            study.tell(trial, budget_value(outcome, target, cfg.failure_cost))
        else:
            study.tell(trial, outcome.values)
        ran, done = ran + 1, done + 1
        log(
            f"trial {trial.number}: {describe(outcome.to_dict())}, KL {outcome.kl:.4g}, "
            f"{outcome.seconds:.1f} s"
        )
        progress.start(f"search: {_describe_best(completed(study), cfg, baselines)}", cfg.trials)
        progress.advance(done)
    return ran, stopped


def evaluate_trial(judge: Judge, hooks) -> Outcome:
    """One trial's judgement (a seam for tests that interrupt a search mid-trial)."""
    return judge(hooks)


def make_judge(cfg: SearchConfig, ready: _Ready, model) -> Judge:
    guard = None if ready.safety_judge is None else ready.safety_judge.open(cfg)
    scorer = None
    if ready.eval_task is not None:
        from .evalbench import TaskScorer

        scorer = TaskScorer(
            model, ready.tok, ready.eval_task, cfg.eval_limit, cfg.batch_size, cfg.seed
        )
    return Judge(
        model,
        ready.tok,
        ready.harmful_rows,
        ready.harmless_rows,
        cfg.batch_size,
        cfg.max_new_tokens,
        guard,
        ready.harmful_prompts,
        cfg.max_surprisal,
        scorer,
    )


def _load(cfg: SearchConfig, ready: _Ready, progress: Progress):
    progress.start("loading the model", None)
    return Session.open(ready.folder, cfg, tok=ready.tok).model


def _clear(out: Path) -> None:
    """--overwrite: remove what a search wrote (and nothing else)."""
    for name in (STUDY_FILE, *OUTPUTS):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def search(
    cfg: SearchConfig,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    replace_other: bool = False,
) -> SearchResult:
    """Run (or resume) the search, then write the Pareto front and the chosen edit.
    ``replace_other``: a stored study with other settings is discarded, not refused (a recipe
    stage whose inputs changed)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # ours is the only bar
    progress = progress or Progress()
    clock = time.perf_counter()
    check_device(cfg.device)
    out = _check_out(cfg)
    ready = prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if cfg.overwrite:
            _clear(out)
        study = open_study(out, ready.settings, replace_other)
        start_from_measure(study, ready)
        requeued = requeue_interrupted(study)
        if requeued:
            log(f"resuming: trials {requeued} were interrupted and run again")
        ran, stopped = 0, False
        if len(completed(study)) < cfg.trials or "baselines" not in study.user_attrs:
            model = _load(cfg, ready, progress)
            judge = make_judge(cfg, ready, model)
            _baselines(study, judge, model, ready, log)
            ran, stopped = _run_trials(cfg, study, judge, model, ready, log, progress, clock)
        baselines = study.user_attrs["baselines"]
        trials = sorted(completed(study), key=lambda t: t.number)
        chosen = choose_for(trials, cfg, baselines)
        front = pareto(trials)
        report = report_dict(cfg, study, ready, trials, front, chosen, baselines)
        write_outputs(out, cfg, ready, report, chosen)
    return SearchResult(
        out, study.study_name, trials, front, chosen, baselines, requeued, ran, stopped, report
    )


# --- outputs -----------------------------------------------------------------------------


def _trial_dict(t, front_numbers: set[int]) -> dict:
    attrs = t.user_attrs
    return {
        "number": t.number,
        "failure": attrs["failure"],
        "kl": attrs["kl"],
        "refused": attrs["refused"],
        "complied": attrs["complied"],
        "broken": attrs["broken"],
        "unsafe": attrs.get("unsafe"),
        "judge_errors": attrs.get("judge_errors", 0),
        "implausible": attrs.get("implausible", 0),
        "score": attrs.get("score"),
        "drop": attrs.get("drop"),
        "seconds": attrs["seconds"],
        "direction": attrs["direction"],
        "params": dict(sorted(t.params.items())),
        "pareto": t.number in front_numbers,
        "retry_of": t.system_attrs.get("failed_trial"),
    }


def apply_args(cfg: SearchConfig, out: Path, params: EditParams, n_layers: int) -> list[str]:
    """``orthoedit apply`` arguments that reproduce a trial's edit (without ``--out``)."""
    sites, _ = params.plan_scales(n_layers)
    args = [cfg.model, "--direction", str(out / "chosen" / "direction.safetensors")]
    args += ["--scales", str(out / "chosen" / "scales.json"), "--sites", ",".join(sites)]
    if cfg.revision:
        args += ["--revision", cfg.revision]
    return args


def report_dict(cfg, study, ready: _Ready, trials, front, chosen, baselines) -> dict:
    out = Path(cfg.out).expanduser().resolve()
    numbers = {t.number for t in front}
    entry = None
    if chosen is not None:
        params = params_of(chosen.params)
        entry = {
            **_trial_dict(chosen, numbers),
            "scales": params.scales(ready.n_layers),
            "apply_args": apply_args(cfg, out, params, ready.n_layers),
        }
    judging = study.user_attrs.get("judging", {})
    return {
        "study": study.study_name,
        "storage": str(out / STUDY_FILE),
        "sampler": "optuna TPESampler (multivariate, "
        + ("one objective" if cfg.objective == "budget" else "multi-objective")
        + "), re-seeded per trial",
        "minimized": (
            f"KL + {cfg.failure_cost:g} per harmful prompt failed beyond the budget "
            f"({budget(cfg, baselines)})"
            if cfg.objective == "budget"
            else "failure and KL"
            + ("" if cfg.eval_task is None else " and drop")
            + " (the Pareto front)"
        ),
        "space": asdict(ready.space),
        "objectives": {
            "failure": "share of harmful validation prompts answered with a refusal or a "
            "degenerate answer (greedy, max_new_tokens; word salad: mean surprisal under the "
            f"unedited model above {judging.get('max_surprisal', float('nan')):.3g} nats "
            "per token)"
            + ("" if cfg.judge is None else f", or that {cfg.judge} does not call unsafe"),
            "kl": "first-token KL(unedited ‖ edited), harmless validation prompts",
            **(
                {}
                if cfg.eval_task is None
                else {
                    "drop": f"unedited minus edited {cfg.eval_task} score "
                    f"({judging.get('eval_metric')}, {cfg.eval_limit} documents)"
                }
            ),
        },
        "settings": ready.settings,
        "max_kl": cfg.max_kl,
        "max_failure": cfg.max_failure,
        "max_failure_rate": target_failure(cfg.max_failure, baselines),
        "budget": budget(cfg, baselines),
        "max_drop": cfg.max_drop,
        "trials_wanted": cfg.trials,
        "trials_completed": len(trials),
        "judging": judging,
        "baselines": baselines,
        "chosen": entry,
        "pareto": [t.number for t in front],
        "trials": [_trial_dict(t, numbers) for t in trials],
        "orthoedit_version": __version__,
    }


def _write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(out: Path, cfg: SearchConfig, ready: _Ready, report: dict, chosen) -> None:
    """pareto.{json,md,png} (each written beside and renamed) and ``chosen/`` (staged and
    renamed as a whole; removed when no trial is within the budget)."""
    from .output import staged_output
    from .report import search_markdown, search_png

    png_tmp = out / ".pareto.png.tmp"
    search_png(report, png_tmp, cfg.model)
    os.replace(png_tmp, out / "pareto.png")
    _write_file(out / "pareto.json", json.dumps(report, indent=2) + "\n")
    _write_file(out / "pareto.md", search_markdown(report))
    if chosen is None:
        shutil.rmtree(out / "chosen", ignore_errors=True)
        return
    with staged_output(out / "chosen") as tmp:
        write_chosen(tmp, cfg, ready, report, chosen)


def chosen_sites(scales_path: Path) -> list[str]:
    """The sites a ``chosen/scales.json`` edits at all (what ``apply.txt`` passes as
    ``--sites``)."""
    raw = json.loads(Path(scales_path).read_text())
    sites = ["embed"] if raw.get("embed", 0) > 0 else []
    return sites + [site for site in SITES_SEARCHED if any(s > 0 for s in raw.get(site, []))]


def write_chosen(folder: Path, cfg: SearchConfig, ready: _Ready, report: dict, chosen) -> None:
    """direction.safetensors, scales.json, apply.txt and recipe-fragment.yaml of the chosen
    trial; paths inside point at the final ``OUT/chosen`` folder."""
    from .direction import save_direction

    entry = report["chosen"]
    final = Path(cfg.out).expanduser().resolve() / "chosen"
    params = params_of(chosen.params)
    vector, source = blend(ready.candidates, params.layer, params.position)
    meta = {
        "kind": "single",
        "model": cfg.model,
        "search_layer": repr(params.layer),
        "position": params.position,
        "blended_layers": ",".join(map(str, source["layers"])),
        "blend_weights": ",".join(repr(w) for w in source["weights"]),
        "search_study": report["study"],
        "search_trial": chosen.number,
        "candidates_sha256": ready.settings["candidates_sha256"],
    }
    if len(source["layers"]) == 1:  # a measured candidate itself, as measure records it
        meta["layer"] = source["layers"][0]
    save_direction(folder / "direction.safetensors", vector, meta)
    (folder / "scales.json").write_text(json.dumps(params.scales(ready.n_layers), indent=1) + "\n")
    sites, _ = params.plan_scales(ready.n_layers)
    command = ["orthoedit", "apply", *entry["apply_args"], "--out", "edited"]
    note = "" if sites else "# the chosen trial edits nothing: there is nothing to apply\n"
    (folder / "apply.txt").write_text(note + shlex.join(command) + "\n")
    fragment = (
        f"# orthoedit search: trial {chosen.number}, {describe(entry)}, KL {entry['kl']:.4g} "
        "on the search's validation prompts.\n"
        "# Paste into a recipe (it replaces the measure stage with this direction):\n"
        f"direction: {json.dumps(str(final / 'direction.safetensors'))}\n"
        "edit:\n"
        f"  sites: [{', '.join(sites)}]\n"
        f"  scales: {json.dumps(str(final / 'scales.json'))}\n"
    )
    (folder / "recipe-fragment.yaml").write_text(fragment)
