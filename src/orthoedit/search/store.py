"""The Optuna study a search keeps in ``OUT/study.db``: its name, its sampler, its first
trial (measure's selection) and the trials a killed process left running."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from ..errors import BadInputError
from .inputs import STUDY_FILE, Ready, study_name
from .space import (
    SITES_SEARCHED,
)


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
