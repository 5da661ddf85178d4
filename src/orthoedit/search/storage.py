"""Where a search keeps its Optuna study: ``OUT/study.db`` (SQLite, one process, the folder
locked), or a database that several search processes share (``--storage URL``).

A shared study needs three things a lone process gets from its folder lock:

* **one claim at a time**: deciding whether a trial is still wanted and asking for it happen
  under ``exclusive``, a lock held in the database itself (a row lock on the study's
  ``settings`` attribute, taken by a no-op UPDATE in a transaction of its own; for an SQLite
  file given as ``--storage``, a file lock beside it), so that workers never start more trials
  than ``--trials``;
* **heartbeats**: a worker records one for its running trial every ``interval`` seconds
  (Optuna's RDB heartbeat); a trial whose worker stopped beating for ``grace`` seconds is
  marked failed and queued again with the same parameters (``fail_stale``);
* **no secret in the open**: the URL's password is never printed nor written (``masked``).
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInputError

#: Seconds between a running trial's heartbeats, and without one before it counts as stopped.
HEARTBEAT_INTERVAL = 10
HEARTBEAT_GRACE = 40
#: ``INTERVAL[:GRACE]`` in whole seconds (GRACE: 4 intervals when left out), for tests and
#: slow links.
HEARTBEAT_ENV = "ORTHOEDIT_SEARCH_HEARTBEAT"
EXAMPLE_URL = "postgresql://user@host/db"


def masked(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_url(url: str) -> str:
    """The URL to connect with, checked before anything loads: a database URL, a dialect
    SQLAlchemy knows and its driver installed (``postgresql://`` takes psycopg 3 when psycopg2
    is absent). Any problem is one line that does not repeat the password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise BadInputError(
            f"--storage is not a database URL; give an SQLAlchemy URL such as {EXAMPLE_URL}."
        ) from None
    plain_postgres = parsed.drivername == "postgresql" and not _importable("psycopg2")
    if plain_postgres and _importable("psycopg"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise BadInputError(
            f"--storage {masked(url)}: unknown database kind {parsed.drivername!r}; give an "
            f"SQLAlchemy URL such as {EXAMPLE_URL}, mysql+pymysql://user@host/db or "
            "sqlite:///path/study.db."
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        ours = parsed.drivername in ("postgresql", "postgresql+psycopg")  # the extra's driver
        hint = (
            "pip install 'orthoedit[postgres]'"
            if ours
            else f"install the Python package that provides {err.name}"
        )
        raise BadInputError(
            f"--storage {masked(url)}: its driver ({err.name}) is not installed; {hint}."
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise BadInputError(
            f"--storage {masked(url)}: an in-memory database cannot be shared; give a file "
            "(sqlite:///path/study.db) or a database server."
        )
    return parsed.render_as_string(hide_password=False)


def heartbeat() -> tuple[int, int]:
    """(interval, grace) in seconds: ``$ORTHOEDIT_SEARCH_HEARTBEAT`` or the defaults."""
    text = os.environ.get(HEARTBEAT_ENV)
    if not text:
        return HEARTBEAT_INTERVAL, HEARTBEAT_GRACE
    try:
        parts = [int(p) for p in text.split(":")]
        interval, grace = parts if len(parts) == 2 else (parts[0], 4 * parts[0])
        if interval < 1 or grace <= interval or len(parts) > 2:
            raise ValueError
    except ValueError:
        raise BadInputError(
            f"${HEARTBEAT_ENV}={text!r}: give INTERVAL:GRACE in whole seconds, GRACE above "
            f"INTERVAL (default {HEARTBEAT_INTERVAL}:{HEARTBEAT_GRACE})."
        ) from None
    return interval, grace


def retry_callback():
    """Optuna's callback that queues a failed trial again with the same parameters."""
    from optuna import storages

    # optuna >= 4.9 names it RetryHeartbeatStaleTrialCallback; older releases RetryFailed...
    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental
        return (cls or storages.RetryFailedTrialCallback)()


def worker_name() -> str:
    """This process, as a trial records who ran it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Storage:
    """An opened study storage: Optuna's ``rdb``, ``where`` it is for messages and reports
    (a path, or the URL without its password), and whether other processes share it."""

    rdb: object  # optuna.storages.RDBStorage
    where: str
    shared: bool = False
    lock_file: Path | None = None  # an SQLite file given as --storage: a file lock beside it
    _ids: dict = field(default_factory=dict)

    @property
    def poll_seconds(self) -> float:
        """How long a worker waits before looking again at trials other workers run."""
        interval = self.rdb.get_heartbeat_interval() or 2
        return min(2.0, interval / 2)

    def study_id(self, study) -> int:
        if study.study_name not in self._ids:
            self._ids[study.study_name] = self.rdb.get_study_id_from_name(study.study_name)
        return self._ids[study.study_name]

    @contextlib.contextmanager
    def exclusive(self, study) -> Iterator[None]:
        """No other worker of ``study`` is inside this block meanwhile (a lone process: its
        folder lock already says so)."""
        if not self.shared:
            yield
        elif self.lock_file is not None:
            with self.lock_file.open("a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                yield
        else:
            import sqlalchemy as sa

            # Optuna's table of study attributes (its schema), quoted as each database wants
            attrs = sa.table(
                "study_user_attributes", *map(sa.column, ("study_id", "key", "value_json"))
            )
            lock = (
                sa.update(attrs)
                .where(attrs.c.study_id == self.study_id(study), attrs.c.key == "settings")
                .values(value_json=attrs.c.value_json)
            )
            with self.rdb.engine.begin() as conn:  # committed (the lock let go) at the end
                locked = conn.execute(lock)
                if locked.rowcount != 1:
                    raise RuntimeError(f"study {study.study_name} has no settings to lock")
                yield

    def fail_stale(self, study) -> list[int]:
        """Trials whose worker stopped beating: marked failed and queued again (shared
        storage only; call inside ``exclusive``). Returns their numbers."""
        if not self.shared:
            return []
        import optuna
        from optuna.trial import TrialState

        def numbers(state):
            return {t.number for t in study.get_trials(deepcopy=False, states=(state,))}

        running = numbers(TrialState.RUNNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental
            optuna.storages.fail_stale_trials(study)
        return sorted(running & numbers(TrialState.FAIL))

    def ask(self, study):
        """The next trial, running (call inside ``exclusive``): a queued one first, else a new
        one. In a shared study the trial is queued first and its first heartbeat recorded
        before it runs, so that no trial is ever running without one (a worker killed in
        between leaves a queued trial, which the next claim takes), and it records its
        worker."""
        from optuna.trial import TrialState

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "heartbeat ... used with Study.optimize"
            if not self.shared:
                return study.ask()
            queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not queued:
                study.enqueue_trial({})  # no fixed parameter: the sampler chooses them all
                queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            self.rdb.record_heartbeat(queued[0]._trial_id)
            trial = study.ask()  # takes the first queued trial (no other worker can: locked)
        trial.set_user_attr("worker", worker_name())
        return trial

    @contextlib.contextmanager
    def beating(self, trial) -> Iterator[None]:
        """Heartbeats for ``trial`` while the block runs (shared storage only)."""
        interval = self.rdb.get_heartbeat_interval() if self.shared else None
        if interval is None:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                self.rdb.record_heartbeat(trial._trial_id)
            self.rdb.remove_session()  # this thread's connection back to the pool

        thread = threading.Thread(target=beat, name="orthoedit-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _connect(real: str, parsed, **options):
    """Optuna's RDBStorage at ``real``. Workers that start together on a new database race
    to create Optuna's tables; the losers' errors (a duplicate table or type) are retried."""
    import random
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat_interval is experimental
                return optuna.storages.RDBStorage(real, **options)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            cause = err if isinstance(err, SQLAlchemyError) else (err.__cause__ or err)
            if isinstance(cause, IntegrityError | ProgrammingError) and attempt < 5:
                time.sleep(0.2 + random.random())
                continue
            text = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [""])[0]
            if parsed.password:
                text = text.replace(str(parsed.password), "***")
            raise BadInputError(
                f"--storage {masked(real)}: cannot open the database ({text[:300]}); is the "
                "server running and the URL right?"
            ) from None
    raise AssertionError("unreachable")


def open_storage(url: str | None, study_file: Path) -> Storage:
    """``study_file`` (SQLite, this process alone) when ``url`` is None, else the shared
    database at ``url``, with heartbeats; a database that cannot be reached is one line."""
    import optuna
    from sqlalchemy.engine import make_url

    if url is None:
        return Storage(optuna.storages.RDBStorage(f"sqlite:///{study_file}"), str(study_file))
    real = check_url(url)
    parsed = make_url(real)
    interval, grace = heartbeat()
    takes = inspect.signature(optuna.storages.RDBStorage).parameters
    callback = (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in takes
        else "failed_trial_callback"
    )
    options = {"heartbeat_interval": interval, "grace_period": grace, callback: retry_callback()}
    rdb = _connect(real, parsed, **options)
    lock = None
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database).expanduser().resolve()
        lock = path.with_name(path.name + ".lock")
    return Storage(rdb, masked(url), shared=True, lock_file=lock)
