"""A throw-away PostgreSQL server for tests and benchmarks: ``initdb`` in a temporary folder,
``postgres`` on a free local port, trust authentication, stopped and removed by ``stop``.

initdb refuses to run as root, so as root the server runs as an unprivileged user (``postgres``
where it exists, else ``nobody``) that owns the folder. The binaries are looked up in
``$ORTHOEDIT_PG_BIN``, on ``PATH``, then in ``/usr/lib/postgresql/*/bin``; ``missing()`` says
in one line why no server can be started (no binaries, or no Python driver).

    server = PgServer.start()
    try:
        url = server.url  # postgresql+psycopg://orthoedit@127.0.0.1:PORT/postgres
    finally:
        server.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

USER = "orthoedit"  # the database role initdb makes (trust: no password needed)


def pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    candidates = [os.environ.get("ORTHOEDIT_PG_BIN")]
    found = shutil.which("initdb")
    candidates.append(str(Path(found).parent) if found else None)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in filter(None, candidates):
        if all((Path(folder) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def missing() -> str | None:
    """Why a server cannot be started here (a reason for pytest.skip), or None."""
    if pg_bin() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install "
            "postgresql or set ORTHOEDIT_PG_BIN"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is not installed: pip install 'orthoedit[postgres]'"
    if os.geteuid() == 0 and (_runner() is None or shutil.which("setpriv") is None):
        return (
            "running as root, and no unprivileged user (postgres, nobody) or no setpriv to run "
            "the server as one (initdb refuses root)"
        )
    return None


def _runner() -> pwd.struct_passwd | None:
    """The unprivileged user the server runs as when we are root."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["setpriv", f"--reuid={_runner().pw_uid}", f"--regid={_runner().pw_gid}",
            "--clear-groups", *args]  # fmt: skip


@dataclass
class PgServer:
    folder: Path
    port: int
    bin: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    @classmethod
    def start(cls, timeout: float = 60) -> PgServer:
        """initdb and start a server; raises RuntimeError with the server's log on failure."""
        reason = missing()
        if reason:
            raise RuntimeError(reason)
        folder = Path(tempfile.mkdtemp(prefix="orthoedit-pg-"))
        if os.geteuid() == 0:
            os.chown(folder, _runner().pw_uid, _runner().pw_gid)
        server = cls(folder, free_port(), pg_bin())
        try:
            data = str(folder / "data")
            server._run(["initdb", "-A", "trust", "-U", USER, "-N", "-E", "UTF8", "-D", data])
            options = (
                f"-c listen_addresses=127.0.0.1 -p {server.port} -k {folder} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            log = str(folder / "server.log")
            wait = ["-w", "-t", str(int(timeout))]
            server._run(["pg_ctl", "start", *wait, "-D", data, "-l", log, "-o", options])
        except Exception:
            log = folder / "server.log"
            text = log.read_text()[-2000:] if log.is_file() else ""
            server.stop()
            raise RuntimeError(f"PostgreSQL did not start: {text}") from None
        return server

    def _run(self, args: list[str]) -> None:
        args = [str(self.bin / args[0]), *args[1:]]
        done = subprocess.run(
            _as_server_user(args), capture_output=True, text=True, cwd=self.folder, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}"[-2000:])

    def stop(self) -> None:
        """Stop the server (immediately) and remove its folder; safe to call twice."""
        if (self.folder / "data" / "postmaster.pid").exists():
            args = [str(self.bin / "pg_ctl"), "stop", "-m", "immediate", "-w", "-D",
                    str(self.folder / "data")]  # fmt: skip
            subprocess.run(_as_server_user(args), capture_output=True, cwd=self.folder)
        deadline = time.monotonic() + 10
        while (self.folder / "data" / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.folder, ignore_errors=True)
