"""``search``: prepare, open or resume the study, run the trials, choose and write the
outputs."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import SearchConfig
from ..errors import BadInputError
from ..folders import SearchFolder
from ..progress import Progress
from ..runtime.session import start_stage
from .choice import budget, budget_value, choose_for, objectives, pareto, target_failure
from .confirm import confirm, kept, previous
from .front import add_to_report, judge_front
from .inputs import Ready, prepare, study_name
from .outputs import report_dict, write_outputs, write_report
from .space import (
    suggest,
)
from .storage import Storage, check_url, open_storage
from .store import (
    MEASURE_START,
    claim,
    completed,
    open_study,
    requeue_interrupted,
    start_from_measure,
)
from .trial import TrialResult, TrialRunner, describe, edit_hooks, measure_hooks, open_runner


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    with SearchFolder(out).lock.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BadInputError(
                f"another orthoedit search is running on {out}; wait for it or use another --out."
            ) from None
        yield


def _check_out(cfg: SearchConfig) -> Path:
    from ..output import check_apart, clean_stale, inputs_of

    out = Path(cfg.out).expanduser().resolve()
    folder = SearchFolder(out)
    check_apart(out, inputs_of(cfg), "--out")
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder.")
    if cfg.storage is not None and folder.study.is_file():
        raise BadInputError(
            f"--out {out} holds a study of its own ({folder.study.name}); with --storage, give "
            "another --out."
        )
    if out.is_dir() and not folder.study.is_file():
        outputs = [p.name for p in folder.outputs()]
        for name in outputs:  # what a killed search left staged of its outputs
            clean_stale(out / name)
        ours = {*outputs, folder.lock.name, *(f".{name}.tmp" for name in outputs)}
        strangers = [p.name for p in out.iterdir() if p.name not in ours]
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
    baselines: dict  # "no edit" and "measure" TrialResult dicts
    requeued: list[int]
    ran: int  # trials run by this call
    stopped_by_time: bool
    report: dict
    strong: dict | None = None  # the front judged again (``front.judge_front``)

    @property
    def confirmation(self) -> dict | None:
        """--confirm's summary (``confirm.py``), or the last one while it is of the chosen
        trial."""
        return self.report.get("confirmation")


def _baselines(study, storage: Storage, runner: TrialRunner, model, ready: Ready, log) -> None:
    """The unedited model and measure's own selection, judged like a trial (stored in the study,
    so a resumed search does not judge them again; in a shared study the first worker's)."""
    if "baselines" in study.user_attrs:
        return
    found = {
        "no edit": runner(contextlib.nullcontext).to_dict(),
        "measure": runner(measure_hooks(model, ready)).to_dict(),
    }
    for name, o in found.items():
        log(f"{name}: {describe(o)}, KL {o['kl']:.4g}")
    judging = {"max_surprisal": runner.max_surprisal}
    if runner.scorer is not None:
        judging |= {"eval_metric": runner.scorer.key, "eval_base_score": runner.base_score}
    with storage.exclusive(study):
        if "baselines" not in study.user_attrs:  # another worker may have stored its own
            study.set_user_attr("judging", judging)
            study.set_user_attr("baselines", found)


def _describe_best(trials: list, cfg: SearchConfig, baselines: dict | None) -> str:
    best = choose_for(trials, cfg, baselines)
    if best is None:
        return f"none with {budget(cfg, baselines)} yet"
    failure, kl = objectives(best)[:2]
    return f"best with {budget(cfg, baselines)}: #{best.number} failure {failure:.1%}, KL {kl:.3g}"


def _show(progress: Progress, study, cfg: SearchConfig, done: int) -> None:
    baselines = study.user_attrs["baselines"]
    progress.start(f"search: {_describe_best(completed(study), cfg, baselines)}", cfg.trials)
    progress.advance(min(done, cfg.trials))


def _one_trial(cfg, study, storage: Storage, runner: TrialRunner, model, ready: Ready, trial):
    """Judge one claimed trial (its heartbeat beating meanwhile) and tell the study; None
    when another worker gave it up meanwhile (no heartbeat for the grace period)."""
    from optuna.trial import TrialState

    try:
        with storage.beating(trial):
            params = suggest(trial, ready.n_layers, ready.space)
            hooks, _, source = edit_hooks(model, ready, params)
            if trial.user_attrs.get("start") == MEASURE_START:
                # the "measure" baseline judged this very edit already
                outcome = TrialResult.from_dict(study.user_attrs["baselines"]["measure"])
            else:
                outcome = evaluate_trial(runner, hooks)
    except Exception:
        # an error, not an interruption: recorded as failed, not re-run on resume
        study.tell(trial, state=TrialState.FAIL)
        raise
    try:
        for key, value in {**outcome.to_dict(), "direction": source}.items():
            trial.set_user_attr(key, value)
        if cfg.objective == "budget":
            target = target_failure(cfg.max_failure, study.user_attrs["baselines"])
            study.tell(trial, budget_value(outcome, target, cfg.failure_cost))
        else:
            study.tell(trial, outcome.values)
    except Exception:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if storage.shared and trial.number in {t.number for t in failed}:
            return None  # another worker found it stale meanwhile: its rerun counts instead
        raise
    return outcome


def _run_trials(cfg, study, storage: Storage, work: _Work, clock) -> tuple[int, bool]:
    """Claim, judge and tell until the study has ``cfg.trials`` completed trials (in a shared
    study: until no trial is left to run or waiting on another worker) or the time is spent.
    An interruption (Ctrl-C, a kill) leaves the trial running in the study, to be re-run."""
    ran, stopped, waiting = 0, False, False
    while True:
        if cfg.time_budget is not None and time.perf_counter() - clock >= cfg.time_budget:
            stopped = True
            work.log(f"time budget of {cfg.time_budget:g} s spent: no new trial started")
            break
        got = claim(study, storage, cfg.trials, cfg.seed, cfg.startup_trials)
        for number in got.stale:
            work.log(f"trial {number}: its worker stopped beating; failed and queued again")
        _show(work.progress, study, cfg, got.completed)
        if got.trial is None and not got.wait:
            break
        if got.trial is None:
            if not waiting:
                work.log("waiting for the trials other workers are running")
            waiting = True
            time.sleep(storage.poll_seconds)
            continue
        waiting = False
        runner, model = work.loaded(study, storage)
        outcome = _one_trial(cfg, study, storage, runner, model, work.ready, got.trial)
        ran += outcome is not None
        work.log(
            f"trial {got.trial.number}: given up as stale by another worker; its rerun counts"
            if outcome is None
            else f"trial {got.trial.number}: {describe(outcome.to_dict())}, "
            f"KL {outcome.kl:.4g}, {outcome.seconds:.1f} s"
            + (
                " (the measure baseline)"
                if got.trial.user_attrs.get("start") == MEASURE_START
                else ""
            )
        )
    _show(work.progress, study, cfg, len(completed(study)))
    return ran, stopped


def evaluate_trial(runner: TrialRunner, hooks) -> TrialResult:
    """One trial's judgement (a seam for tests that interrupt a search mid-trial:
    ``orthoedit.search.loop.evaluate_trial``)."""
    return runner(hooks)


@dataclass
class _Work:
    """What judges trials in this process: the model and its runner, loaded on first need (a
    worker that joins a finished study only writes the outputs)."""

    cfg: SearchConfig
    ready: Ready
    log: Callable[[str], None]
    progress: Progress
    runner: TrialRunner | None = None
    model: object = None

    def loaded(self, study, storage: Storage) -> tuple[TrialRunner, object]:
        if self.runner is None:
            self.progress.start("loading the model", None)
            self.runner = open_runner(self.cfg, self.ready, self.log)
            self.model = self.runner.model
            _baselines(study, storage, self.runner, self.model, self.ready, self.log)
        return self.runner, self.model

    def release(self) -> None:
        """Free the model (and a guard model) before the next stage loads its own."""
        import gc

        self.runner = self.model = None
        gc.collect()


def _clear(out: Path) -> None:
    """--overwrite: remove what a search wrote (and nothing else: a folder of an output's
    name without orthoedit's marker stays)."""
    from ..output import remove_output

    folder = SearchFolder(out)
    for path in (folder.study, *folder.outputs()):
        if path.is_dir():
            remove_output(path)
        elif path.exists():
            path.unlink()


def search(
    cfg: SearchConfig,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    replace_other: bool = False,
) -> SearchResult:
    """Run (or resume, or join) the search, then write the Pareto front and the chosen edit.
    ``replace_other``: a stored study with other settings in ``OUT/study.db`` is discarded,
    not refused (a recipe stage whose inputs changed)."""

    progress = start_stage(cfg.device, progress)
    clock = time.perf_counter()
    if cfg.storage is not None:
        check_url(cfg.storage)  # a bad URL or a missing driver: one line, nothing written
    out = _check_out(cfg)
    ready = prepare(cfg)
    shared = None if cfg.storage is None else open_storage(cfg.storage, None)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        if cfg.overwrite:
            _clear(out)
        storage = shared or open_storage(None, SearchFolder(out).study)
        name = cfg.study or study_name(ready.settings)
        study = open_study(storage, name, ready.settings, replace_other)
        with storage.exclusive(study):
            start_from_measure(study, ready)
        if storage.shared:
            log(f"study {name} in {storage.where}: {len(completed(study))} completed trials")
        requeued = [] if storage.shared else requeue_interrupted(study)
        if requeued:
            log(f"resuming: trials {requeued} were interrupted and run again")
        work = _Work(cfg, ready, log, progress)
        ran, stopped = 0, False
        if len(completed(study)) < cfg.trials or "baselines" not in study.user_attrs:
            work.loaded(study, storage)
            ran, stopped = _run_trials(cfg, study, storage, work, clock)
        baselines = study.user_attrs["baselines"]
        trials = sorted(completed(study), key=lambda t: t.number)
        strong = judge_front(cfg, study, storage, work, trials)
        chosen = choose_for(trials, cfg, baselines, strong)
        front = pareto(trials)
        report = report_dict(cfg, study, ready, trials, front, chosen, baselines, storage.where)
        add_to_report(report, strong, cfg)
        _write(out, cfg, work, report, chosen)
    return SearchResult(
        out, study.study_name, trials, front, chosen, baselines, requeued, ran, stopped, report,
        strong,
    )  # fmt: skip


def _write(out: Path, cfg: SearchConfig, work: _Work, report: dict, chosen) -> None:
    """pareto.* and chosen/; then with --confirm the confirmation (``confirm.py``), without it
    the last one while it is of the chosen trial."""
    before = previous(out)
    confirming = cfg.confirm and chosen is not None
    report["confirmation"] = None if confirming else kept(out, report["study"], chosen, before)
    write_outputs(out, cfg, work.ready, report, chosen)
    if confirming:
        work.release()
        found = confirm(cfg, work.ready, out, report, before, work.log, work.progress)
        report["confirmation"] = found
        write_report(out, report)
    elif cfg.confirm:
        work.log("confirm: no trial was chosen, so there is nothing to confirm")
