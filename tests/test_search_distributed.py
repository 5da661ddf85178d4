"""``orthoedit search --storage URL --study NAME``: worker processes on one study in a real
PostgreSQL server, started here on a free local port (skipped, with the reason, where the server
binaries or the driver are absent). Two workers on the organism finish a 20-trial study with
exactly 20 distinct completed trials, also when one of them is killed with SIGKILL mid-trial
(its trial is failed by heartbeat and run again by the other); any worker writes the outputs,
and one joining a finished study only writes them; bad URLs are one line with nothing written,
and a password in the URL is never shown nor stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

import pgserver
from orthoedit.config import SearchConfig
from orthoedit.organism import CHAT_MODEL
from orthoedit.runtime.session import Session
from orthoedit.search import loop as loop_module
from orthoedit.search import search
from orthoedit.search.storage import HEARTBEAT_ENV
from orthoedit.search.store import MEASURE_START
from test_cli import cli, one_line_error, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

SRC = Path(__file__).resolve().parents[1] / "src"
TRIALS = 20
FAST = {"n": 6, "max_new_tokens": 12, "startup_trials": 2, "max_kl": 0.2}
#: A worker whose every trial takes ``$TRIAL_SLEEP`` seconds longer (so that workers overlap,
#: and a victim can be killed mid-trial), then the orthoedit command line.
WORKER = """
import os, sys, time
import orthoedit.search.loop as loop
judged = loop.evaluate_trial
def slower(judge, hooks):
    outcome = judged(judge, hooks)
    time.sleep(float(os.environ["TRIAL_SLEEP"]))
    return outcome
loop.evaluate_trial = slower
from orthoedit.cli import entry
entry()
"""


@pytest.fixture(scope="module")
def pg():
    reason = pgserver.missing()
    if reason:
        pytest.skip(reason)
    server = pgserver.PgServer.start()
    try:
        yield server
    finally:
        server.stop()


def _args(measured: Path, out: Path, url: str, study: str, *extra) -> list[str]:
    args = ["search", CHAT_MODEL, "--candidates", measured, "--out", out, "--storage", url]
    args += ["--study", study, "--trials", TRIALS, *extra]
    for key, value in FAST.items():
        args += ["--" + key.replace("_", "-"), value]
    return [str(a) for a in args]


def _config(measured: Path, out: Path, url: str, study: str, trials: int) -> SearchConfig:
    """A worker's search settings, as run in process."""
    return SearchConfig(
        model=str(CHAT_MODEL),
        candidates=measured,
        out=out,
        storage=url,
        study=study,
        trials=trials,
        **FAST,
    )


def _worker(measured: Path, out: Path, url: str, study: str, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), HEARTBEAT_ENV: "1:3", "TRIAL_SLEEP": str(sleep)}
    env["OMP_NUM_THREADS"] = "1"  # two workers on two cores (more threads stall each other)
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115  (closed with the process)
    args = [sys.executable, "-c", WORKER, *_args(measured, out, url, study)]
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, out.with_suffix(".log").read_text()[-3000:]


def _wait_for(what, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def _trials(url: str, study: str) -> list:
    try:
        return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    except KeyError:  # not made yet
        return []


def _by(proc: subprocess.Popen):
    return lambda t: t.user_attrs.get("worker", "").endswith(f":{proc.pid}")


def _report(out: Path) -> dict:
    return json.loads((out / "pareto.json").read_text())


def _params(trial) -> str:
    return json.dumps(trial.params, sort_keys=True)


def test_two_workers_finish_one_study(pg, organism_measured, tmp_path, monkeypatch):
    outs = [tmp_path / "w1", tmp_path / "w2"]
    procs = [_worker(organism_measured, out, pg.url, "two", sleep=0.2) for out in outs]
    for proc, out in zip(procs, outs, strict=True):
        _finish(proc, out)
    trials = _trials(pg.url, "two")
    assert Counter(t.state.name for t in trials) == {"COMPLETE": TRIALS}
    assert [t.number for t in trials] == list(range(TRIALS))
    assert len({_params(t) for t in trials}) == TRIALS
    assert trials[0].user_attrs["start"] == "measure's selection"
    assert all(any(map(_by(p), trials)) for p in procs), "both workers ran trials"
    # each worker wrote the whole study's outputs into its own folder
    reports = [_report(out) for out in outs]
    for report, out in zip(reports, outs, strict=True):
        assert report["trials_completed"] == TRIALS and report["study"] == "two"
        assert report["storage"] == pg.url
        assert (out / "chosen" / "apply.txt").is_file() and (out / "pareto.png").is_file()
        assert not (out / "study.db").exists()
    assert reports[0]["trials"] == reports[1]["trials"]
    assert reports[0]["chosen"]["number"] == reports[1]["chosen"]["number"]
    # a worker that joins the finished study loads no model and only writes the outputs
    monkeypatch.setattr(Session, "open", lambda *a, **k: pytest.fail("loaded"))
    cfg = _config(organism_measured, tmp_path / "late", pg.url, "two", TRIALS)
    late = search(cfg, log=lambda m: None)
    assert late.ran == 0 and len(late.trials) == TRIALS
    assert _report(tmp_path / "late")["trials"] == reports[0]["trials"]


def _measures(trial) -> bool:
    """Measure's selection, which takes its baseline's judgement and never sleeps."""
    return trial.user_attrs.get("start") == MEASURE_START


def test_a_killed_workers_trial_is_run_again(pg, organism_measured, tmp_path):
    """SIGKILL mid-trial: the trial stays running until its heartbeat is stale, is then marked
    failed and queued again with the same parameters, and the other worker runs it; the study
    still ends with exactly TRIALS completed trials."""
    victim = _worker(organism_measured, tmp_path / "victim", pg.url, "killed", sleep=120)
    _wait_for(lambda: _trials(pg.url, "killed"))  # made, measure's trial queued
    healthy = _worker(organism_measured, tmp_path / "healthy", pg.url, "killed", sleep=0.1)
    running = lambda: [  # noqa: E731
        t
        for t in _trials(pg.url, "killed")
        if t.state.name == "RUNNING" and _by(victim)(t) and not _measures(t)
    ]
    held = _wait_for(running)[0]  # the victim's first judged trial: it never ends
    _wait_for(lambda: sum(map(_by(healthy), _trials(pg.url, "killed"))) >= 3)  # mid-run
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _finish(healthy, tmp_path / "healthy")
    trials = _trials(pg.url, "killed")
    assert Counter(t.state.name for t in trials) == {"COMPLETE": TRIALS, "FAIL": 1}
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert failed.number == held.number and _by(victim)(failed)
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == held.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == failed.params and _by(healthy)(retry[0])
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({_params(t) for t in complete}) == TRIALS
    report = _report(tmp_path / "healthy")
    assert report["trials_completed"] == TRIALS
    assert [t["retry_of"] for t in report["trials"] if t["retry_of"] is not None] == [held.number]
    log = (tmp_path / "healthy.log").read_text()
    assert f"trial {held.number}: its worker stopped beating" in log


def test_bad_storage_is_one_line_and_writes_nothing(organism_measured, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def error(url: str, *extra) -> str:
        line = one_line_error(cli(*_args(organism_measured, out, url, "s", *extra)))
        assert "s3cret" not in line and not out.exists()
        return line

    assert "not a database URL" in error("not a url")
    assert "unknown database kind 'nosuch'" in error("nosuch://u:s3cret@h/db")
    line = error("postgresql+pg8000://u:s3cret@h/db")
    assert "driver (pg8000) is not installed" in line and "u:***@h/db" in line
    # neither psycopg nor psycopg2: the extra that installs the driver is named
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "psycopg", None)
        m.setitem(sys.modules, "psycopg2", None)
        m.setattr("orthoedit.search.storage._importable", lambda name: False)
        assert "pip install 'orthoedit[postgres]'" in error("postgresql://u:s3cret@h/db")
    assert "in-memory database cannot be shared" in error("sqlite://")
    assert "--overwrite starts OUT/study.db over" in error("sqlite:///x.db", "--overwrite")
    if pgserver.missing() is None:  # a server that does not answer (no driver: not reached)
        url = f"postgresql://u:s3cret@127.0.0.1:{pgserver.free_port()}/db"
        assert "cannot open the database" in error(url)
    local = tmp_path / "local"
    local.mkdir()
    (local / "study.db").write_bytes(b"")
    line = one_line_error(cli(*_args(organism_measured, local, "sqlite:///x.db", "s")))
    assert "holds a study of its own" in line


def test_password_never_shown_and_other_settings_refused(pg, organism_measured, tmp_path):
    """A password in the URL (trust authentication ignores it) appears in no log line, report
    or file; the URL's plain postgresql:// takes the installed psycopg."""
    url = pg.url.replace("postgresql+psycopg://orthoedit@", "postgresql://orthoedit:s3cret@")
    out = tmp_path / "s"
    lines: list[str] = []
    cfg = _config(organism_measured, out, url, "masked", 2)
    result = search(cfg, log=lines.append)
    assert len(result.trials) == 2
    assert _report(out)["storage"] == url.replace("s3cret", "***")
    assert f"study masked in {url.replace('s3cret', '***')}" in lines[0]
    assert not any("s3cret" in line for line in lines)
    for path in out.rglob("*"):
        assert not path.is_file() or b"s3cret" not in path.read_bytes(), path
    # the same study name with another seed is refused, naming what differs
    args = _args(organism_measured, tmp_path / "t", url, "masked", "--seed", "1")
    line = one_line_error(cli(*args))
    assert "other settings" in line and "seed: 0 -> 1" in line and "--study" in line
    assert "s3cret" not in line and "orthoedit:***@" in line


def test_a_recipe_run_stores_no_password(tmp_path):
    """A recipe's search section may name a shared study; run.json keeps its URL without the
    password (the stage's inputs hash still sees the whole URL)."""
    from orthoedit.pipeline.recipe import Recipe
    from orthoedit.pipeline.run import _open_state

    recipe = Recipe(model="m", search={"storage": "postgresql://u:s3cret@h/db", "trials": 2})
    state = _open_state(tmp_path, recipe, "recipe.yaml")
    assert state["settings"]["search"] == {"storage": "postgresql://u:***@h/db", "trials": 2}
    assert recipe.search["storage"] == "postgresql://u:s3cret@h/db"  # the recipe untouched


def test_an_sqlite_file_can_be_shared(organism_measured, tmp_path):
    """Without a server: an SQLite file given as --storage is shared by processes on one
    machine (the claim lock is a file lock beside it, the heartbeat Optuna's)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = _config(organism_measured, tmp_path / "a", url, "local", 3)
    first = search(cfg, log=lambda m: None)
    assert first.ran == 3 and (tmp_path / "shared.db.lock").is_file()
    assert all(t.user_attrs["worker"].endswith(f":{os.getpid()}") for t in first.trials)
    again = search(cfg.model_copy(update={"out": tmp_path / "b"}), log=lambda m: None)
    assert again.ran == 0 and _report(tmp_path / "b")["trials"] == _report(tmp_path / "a")["trials"]
    assert not (tmp_path / "a" / "study.db").exists()
    # what a worker killed while writing (or confirming) leaves is its own, not a stranger's
    dead_pid = subprocess.Popen(["true"])  # a finished process: its pid is free
    dead_pid.wait()
    staged = tmp_path / "a" / f"..confirm-model.orthoedit-{dead_pid.pid}-x"
    staged.mkdir()
    (tmp_path / "a" / ".pareto.json.tmp").write_text("{")
    third = search(cfg, log=lambda m: None)
    assert third.ran == 0 and not staged.exists()


def test_a_trial_given_up_meanwhile_is_not_counted(organism_measured, tmp_path, monkeypatch):
    """A worker whose trial another worker failed as stale meanwhile (its heartbeat late past
    the grace) does not count it: it goes on, and the rerun completes the study."""
    from optuna.trial import TrialState

    from orthoedit.search.storage import retry_callback

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    judged = loop_module.evaluate_trial
    given_up = []

    def late(judge, hooks):
        outcome = judged(judge, hooks)
        if not given_up:  # what fail_stale_trials does in another worker
            other = optuna.load_study(study_name="late", storage=url)
            running = other.get_trials(states=(TrialState.RUNNING,))[0]
            other.tell(running.number, state=TrialState.FAIL)
            retry_callback()(other, other.get_trials()[running.number])
            given_up.append(running.number)
        return outcome

    monkeypatch.setattr(loop_module, "evaluate_trial", late)
    lines: list[str] = []
    cfg = _config(organism_measured, tmp_path / "s", url, "late", 3)
    result = search(cfg, log=lines.append)
    assert result.ran == 3 and len(result.trials) == 3
    assert f"trial {given_up[0]}: given up as stale by another worker; its rerun counts" in lines
    trials = optuna.load_study(study_name="late", storage=url).trials
    assert Counter(t.state.name for t in trials) == {"COMPLETE": 3, "FAIL": 1}
    assert [t.system_attrs.get("failed_trial") for t in result.trials].count(given_up[0]) == 1
