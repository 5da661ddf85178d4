"""``search``: prepare, open or resume the study, run the trials, choose and write the
outputs."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import SearchConfig
from ..errors import BadInputError
from ..progress import Progress
from ..runtime.session import Session, start_stage
from .choice import budget, budget_value, choose_for, objectives, pareto, target_failure
from .inputs import LOCK_FILE, OUTPUTS, STUDY_FILE, Ready, prepare
from .outputs import report_dict, write_outputs
from .space import (
    suggest,
)
from .store import completed, open_study, requeue_interrupted, sampler_for, start_from_measure
from .trial import Judge, Outcome, describe, edit_hooks, make_judge, measure_hooks


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
    from ..output import check_apart, inputs_of

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


def _baselines(study, judge: Judge, model, ready: Ready, log) -> None:
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


def _describe_best(trials: list, cfg: SearchConfig, baselines: dict | None) -> str:
    best = choose_for(trials, cfg, baselines)
    if best is None:
        return f"none with {budget(cfg, baselines)} yet"
    failure, kl = objectives(best)[:2]
    return f"best with {budget(cfg, baselines)}: #{best.number} failure {failure:.1%}, KL {kl:.3g}"


def _run_trials(cfg, study, judge: Judge, model, ready: Ready, log, progress, clock) -> tuple:
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
    """One trial's judgement (a seam for tests that interrupt a search mid-trial:
    ``orthoedit.search.loop.evaluate_trial``)."""
    return judge(hooks)


def _load(cfg: SearchConfig, ready: Ready, progress: Progress):
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

    progress = start_stage(cfg.device, progress)
    clock = time.perf_counter()
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
