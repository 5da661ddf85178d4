"""The Optuna study a search keeps (``OUT/study.db``, or a database several workers share):
opening or joining it, its sampler, its first trial (measure's selection), claiming the next
trial, and the trials a killed process left running."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass

from ..errors import BadInputError
from .inputs import Ready
from .space import (
    SITES_SEARCHED,
)
from .storage import Storage, retry_callback

#: How long a worker waits for the worker that made a shared study to store its settings.
READY_WAIT_S = 60


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def sampler_for(
    seed: int, completed: int, startup: int, running: int = 0, failed: int = 0, shared=False
):
    """The TPE sampler for the next trial, seeded from (seed, completed trials so far): the
    next trial's parameters depend on the stored history only, not on how many processes it
    took to make it. While other workers' trials run (``running``), the seed also counts them
    and the failed trials, so that two trials started on the same history differ (completed +
    running + failed grows by one with every trial started), and a ``shared`` study's TPE
    treats running trials as liars (Optuna's advice for parallel workers)."""
    import optuna

    key = f"{seed}:{completed}" + (f":{running}:{failed}" if running else "")
    derived = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return optuna.samplers.TPESampler(
        seed=derived, multivariate=True, n_startup_trials=startup, constant_liar=shared
    )


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs) or "unknown settings"


def _names(settings: dict) -> list[str]:
    if settings.get("objective") == "budget":
        return ["kl_plus_failure_cost"]
    return ["failure", "kl"] + (["drop"] if settings.get("eval_task") else [])


def _create(storage: Storage, name: str, settings: dict, load_if_exists: bool):
    import optuna

    names = _names(settings)
    study = optuna.create_study(
        study_name=name,
        storage=storage.rdb,
        directions=["minimize"] * len(names),
        load_if_exists=load_if_exists,
    )
    study.set_metric_names(names)
    if "settings" not in study.user_attrs:
        study.set_user_attr("settings", settings)
    return study


def _only_study(storage: Storage, name: str, settings: dict, replace_other: bool) -> None:
    """``OUT/study.db`` holds one search: any other study in it is refused (or discarded)."""
    import optuna

    existing = [s for s in optuna.get_all_study_names(storage.rdb) if s != name]
    if existing and replace_other:
        for other in existing:
            optuna.delete_study(study_name=other, storage=storage.rdb)
        existing = []
    if existing:
        other = optuna.load_study(study_name=existing[0], storage=storage.rdb)
        raise BadInputError(
            f"{storage.where} holds a search with other settings "
            f"({_settings_diff(_settings_of(other), settings)}); "
            "use another --out, or --overwrite to start over."
        )


def _settings_of(study) -> dict:
    return study.user_attrs.get("settings", {})


def _join(storage: Storage, name: str, settings: dict):
    """A shared study: made by exactly one worker (the database refuses a second study of
    that name), joined by the others once its maker has stored its settings."""
    import optuna

    try:
        return _create(storage, name, settings, load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage.rdb)
    deadline = time.monotonic() + READY_WAIT_S
    while "settings" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise BadInputError(
                f"study {name} in {storage.where} has no settings (the process that made it "
                "stopped while making it); delete it (optuna delete-study) or use another --study."
            )
        time.sleep(0.2)
    return study


def open_study(storage: Storage, name: str, settings: dict, replace_other: bool = False):
    """The study ``name``, created if absent; a study made with other settings is refused (one
    clear line naming what differs), or in ``OUT/study.db`` with ``replace_other`` discarded.
    In a shared storage other studies are left alone."""
    _quiet_optuna()
    settings = json.loads(json.dumps(settings))  # as stored: tuples read back as lists
    if storage.shared:
        study = _join(storage, name, settings)
    else:
        _only_study(storage, name, settings, replace_other)
        study = _create(storage, name, settings, load_if_exists=True)
    if _settings_of(study) != settings:
        # only a study named with --study can differ: the default name hashes the settings
        where = f"study {name} in {storage.where}"
        raise BadInputError(
            f"{where} holds a search with other settings "
            f"({_settings_diff(_settings_of(study), settings)}); use another --study"
            + ("." if storage.shared else ", another --out, or --overwrite to start over.")
        )
    return study


#: The first trial's ``start`` when it is measure's selection exactly: the same edit as the
#: search's "measure" baseline, whose judgement it takes instead of being judged again.
MEASURE_START = "measure's selection"


def measure_params(ready: Ready) -> dict | None:
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


def start_from_measure(study, ready: Ready) -> None:
    """A new study's first trial is measure's selection (or as near it as the space allows),
    so the search starts from it (in a shared study: called inside ``Storage.exclusive``)."""
    params = measure_params(ready)
    if params is not None and not study.get_trials(deepcopy=False):
        meta = ready.baseline_direction.metadata
        exact = params["embed"] and params["direction_layer"] == float(meta["layer"])
        what = MEASURE_START if exact else f"{MEASURE_START}, as near as the space allows"
        study.enqueue_trial(params, user_attrs={"start": what})


def requeue_interrupted(study) -> list[int]:
    """Trials a killed process left running: marked failed, and queued again with the same
    parameters (Optuna's retry callback). Only called while holding the folder's lock, so no
    other process can be running them."""
    from optuna.trial import TrialState

    retry = retry_callback()
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        failed = study.tell(trial.number, state=TrialState.FAIL)
        retry(study, failed)
    return [t.number for t in stale]


def completed(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


@dataclass
class Claim:
    """What a worker is to do next: run ``trial``; or, with none, ``wait`` for trials other
    workers run (one of them may fail and be queued again), or stop (the study is done).
    ``completed``: the study's completed trials; ``stale``: trials just found with a stopped
    worker, marked failed and queued again."""

    trial: object | None
    wait: bool
    completed: int
    stale: list[int]


def claim(study, storage: Storage, wanted: int, seed: int, startup: int) -> Claim:
    """The next trial, if one is still wanted: completed plus running trials stay at most
    ``wanted`` (decided and asked for under the storage's lock, so that workers never start
    more trials between them). A trial queued again (a stopped worker's, or measure's first
    one) is taken before a new one."""
    from optuna.trial import TrialState

    with storage.exclusive(study):
        stale = storage.fail_stale(study)
        counts = Counter(t.state for t in study.get_trials(deepcopy=False))
        done, running = counts[TrialState.COMPLETE], counts[TrialState.RUNNING]
        if done + running >= wanted:
            return Claim(None, running > 0, done, stale)
        failed = counts[TrialState.FAIL]
        study.sampler = sampler_for(seed, done, startup, running, failed, storage.shared)
        return Claim(storage.ask(study), False, done, stale)
