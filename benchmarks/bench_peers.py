"""orthoedit beside heretic (heretic-llm, a peer abliteration tool), from the same inputs,
judged by the same code.

Both tools get the bundled pools' train and validation prompts (``src/orthoedit/pools``) for
their direction and their search, the same trial budget, the same dtype (``auto`` resolved
once here, ``runtime.precision``) and the same number of threads. Each runs as its own
program (heretic is AGPL: it is only ever run, from its own virtual environment, never
imported); its wall time and peak memory (``/usr/bin/time -v``) are recorded. Then the
unedited model and both edited checkpoints are judged on the pools' test split, which
neither tool saw, by orthoedit's one judging layer, after both tools have run: ``eval
safety``'s judging of all of them in one run, the unedited model answering once (refused /
evasive / complied / broken, answers of ``--max-new-tokens``), ``eval kl`` (first-token KL
on harmless test prompts) and ``eval bench``'s capability test (``--capability-task``,
HumanEval in a sandbox by default). Each tool run and judgement is written as it finishes
and read again by a run with the same settings.

Output (``--out``): ``peers.json``, ``peers.md`` (one table), ``peers.png`` (harmful
prompts refused against first-token KL) and ``judged/answers.jsonl``.

``--smoke`` runs in seconds on the model organism (orthoedit only where heretic is not
installed; ``--heretic PATH`` names its executable, default ``/work/heretic-venv/bin/heretic``).

Usage: ``.venv/bin/python benchmarks/bench_peers.py [--model DIR] [--trials 24] [--smoke]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEV_MODEL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct"
HERETIC = Path("/work/heretic-venv/bin/heretic")
TIME = Path("/usr/bin/time")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: the development model")
    p.add_argument("--out", type=Path, default=HERE / "work" / "peers")
    p.add_argument("--trials", type=int, default=24, help="trials of each tool's search")
    p.add_argument("--startup-trials", type=int, default=None, help="default: trials // 2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="both tools run in this (auto: resolved here)")
    p.add_argument("--n", type=int, default=None, help="test prompts of each kind (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--heretic", type=Path, default=HERETIC, help="heretic's executable")
    p.add_argument(
        "--capability-task",
        default="humaneval_instruct_sandbox",
        help="the capability test, an lm-eval task ('' to skip it)",
    )
    p.add_argument(
        "--capability-limit", type=float, default=None, help="its problems (default: all)"
    )
    p.add_argument("--smoke", action="store_true", help="the organism, 2 trials, 8 prompts")
    args = p.parse_args(argv)
    if args.smoke:
        from orthoedit.organism import CHAT_MODEL

        args.model = args.model or Path(CHAT_MODEL)
        args.trials, args.n, args.max_new_tokens = 2, args.n or 8, 16
        if args.capability_task == "humaneval_instruct_sandbox":
            args.capability_task = "organism_capability"
        args.capability_limit = args.capability_limit or 8
    args.model = (args.model or DEV_MODEL).resolve()
    args.startup_trials = args.startup_trials or max(1, args.trials // 2)
    return args


def prompt_source(smoke: bool) -> str:
    """Where both tools' prompts come from: the bundled pools (the organism's in a smoke run)."""
    from orthoedit.prompts import BUNDLED, ORGANISM

    return ORGANISM if smoke else BUNDLED


def write_prompts(source: str, folder: Path, limit: int | None = None) -> dict[str, Path]:
    """The pools' train and validation prompts of each kind as heretic reads a prompt file,
    one a line (``{kind}-{split}.txt``; at most ``limit`` train and ``limit // 2`` val
    prompts). orthoedit reads the same splits from the pools themselves."""
    from orthoedit.prompts import prompt_texts

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in ("harmful", "harmless"):
        for split, most in (("train", limit), ("val", limit and limit // 2)):
            texts = [" ".join(p.split()) for p in prompt_texts(source, kind, split)][:most]
            path = folder / f"{kind}-{split}.txt"
            path.write_text("\n".join(texts) + "\n")
            files[f"{kind}_{split}"] = path
    return files


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` (its output to ``log``): wall seconds, exit code and peak resident memory
    of the largest process (``/usr/bin/time -v``; without it, ``getrusage`` of a fresh
    wrapper process, which counts the same)."""
    report = log.with_suffix(".time")
    if TIME.is_file():
        wrapped = [str(TIME), "-v", "-o", str(report), *cmd]
    else:
        probe = (
            "import resource,subprocess,sys;r=subprocess.call(sys.argv[2:]);"
            "open(sys.argv[1],'w').write('Maximum resident set size (kbytes): %d\\n'"
            "%resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r)"
        )
        wrapped = [sys.executable, "-c", probe, str(report), *cmd]
    began = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call(wrapped, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - began
    return {"rc": rc, "wall_s": wall, "peak_rss_mib": _peak(report), "log": str(log)}


def _peak(report: Path) -> float | None:
    """MiB of the largest process's peak resident memory, from a ``time -v`` report."""
    if not report.is_file():
        return None
    for line in report.read_text().splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) / 1024
    return None


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def run_orthoedit(args, dtype: str, prompts: dict[str, Path], work: Path) -> dict:
    """``orthoedit run`` of a recipe that measures (the pools' train and val prompts), searches
    with the budget, and applies the chosen trial; verify and the evaluations are left to the
    common judging below."""
    import yaml

    recipe = {
        "model": str(args.model),
        "measure": {
            "harmful": prompt_source(args.smoke),
            "harmless": prompt_source(args.smoke),
            "dtype": dtype,
            "batch_size": args.batch_size,
        },
        "search": {
            "trials": args.trials,
            "startup_trials": args.startup_trials,
            "dtype": dtype,
            "batch_size": args.batch_size,
        },
        "edit": {},
        "verify": None,
    }
    if args.smoke:  # fewer prompts, a loose KL threshold: the smoke checks the plumbing
        recipe["measure"] |= {"n_train": 32, "n_val": 16, "max_kl": 0.5}
        recipe["search"] |= {"max_new_tokens": args.max_new_tokens, "max_kl": 0.5}
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    cmd = [
        sys.executable,
        "-m",
        "orthoedit.cli",
        "run",
        str(work / "recipe.yaml"),
        "--out",
        str(run),
    ]
    result = timed(cmd, child_env(args.threads), work / "orthoedit.log")
    result["edited"] = str(run / "model") if result["rc"] == 0 else None
    return result


#: heretic's settings that differ from its defaults (config.default.toml), and why: the
#: budget, the device and the prompt files; the dtype, so that both tools run alike; and how
#: it saves (its default asks). Everything else (direction, kernel, row normalization,
#: refusal markers, system prompt, response length, batch size) is heretic's own.
HERETIC_CHANGES = {
    "n_trials": "the shared budget (default 200)",
    "n_startup_trials": "half the budget, as orthoedit's here (default 60)",
    "device_map": "cpu: the machine has no GPU (default auto, which is the CPU here too)",
    "dtypes": "the one dtype both tools run in (default: auto, i.e. the checkpoint's)",
    "good_prompts / bad_prompts": "the pools' train prompts (default: Hub datasets)",
    "good_evaluation_prompts / bad_evaluation_prompts": "the pools' validation prompts",
    "export_strategy": "merge: a plain checkpoint, without being asked (default: asks)",
}
#: The trial both tools end with: the fewest refusals at first-token KL <= this (orthoedit
#: search's default budget); heretic asks its user to pick from its Pareto front, and this
#: picks for it by the same rule.
MAX_KL = 0.1


def heretic_config(args, dtype: str, prompts: dict[str, Path]) -> str:
    """heretic's config.toml (it reads one from its working folder)."""

    def spec(name: str, path: Path) -> str:
        return f'[{name}]\ndataset = "{path}"\n'

    return "\n".join(
        [
            f'model = "{args.model}"',
            f'dtypes = ["{dtype}"]',
            'device_map = "cpu"',
            f"n_trials = {args.trials}",
            f"n_startup_trials = {args.startup_trials}",
            'export_strategy = "merge"',
            'study_checkpoint_dir = "checkpoints"',
            "",
            spec("good_prompts", prompts["harmless_train"]),
            spec("bad_prompts", prompts["harmful_train"]),
            spec("good_evaluation_prompts", prompts["harmless_val"]),
            spec("bad_evaluation_prompts", prompts["harmful_val"]),
        ]
    )


_CHOICE = re.compile(r"^\[(\d+)\] (.*)$")
_TRIAL = re.compile(r"Trial\s+(\d+)\]? Refusals:\s*(\d+)/(\d+), KL divergence: ([\d.]+)")


def heretic_answer(segment: str, state: dict) -> str:
    """The line to type at one of heretic's questions (its notebook mode reads them from
    stdin): save the chosen trial once, then leave."""
    lines = [line.strip() for line in segment.splitlines()]
    if lines and lines[-1].startswith("Path to the folder"):
        state["saved"] = True
        return state["edited"]
    choices = {int(m[1]): m[2] for m in map(_CHOICE.match, lines) if m}
    first = next((k for k, line in enumerate(lines) if _CHOICE.match(line)), len(lines))
    question = next((line for line in reversed(lines[:first]) if line.endswith("?")), "")
    want = "Exit program"
    if "Which trial" in question and not state.get("saved"):
        return str(_pick_trial(choices, state))
    if "What do you want to do" in question:
        want = "Return to the trial selection" if state.get("saved") else "Save the model"
    elif "How would you like to proceed" in question:
        want = "Ignore the previous run"
    return str(next((i for i, t in choices.items() if t.startswith(want)), max(choices or [1])))


def _pick_trial(choices: dict[int, str], state: dict) -> int:
    """The fewest refusals at KL <= MAX_KL (ties: lower KL); else the lowest KL."""
    trials = []
    for i, title in choices.items():
        m = _TRIAL.search(title)
        if m:
            trials.append((i, int(m[1]), int(m[2]), int(m[3]), float(m[4])))
    within = [t for t in trials if t[4] <= MAX_KL]
    i, number, refusals, n, kl = (
        min(within, key=lambda t: (t[2], t[4])) if within else min(trials, key=lambda t: t[4])
    )
    state["chosen"] = {"trial": number, "refusals": refusals, "of": n, "kl": kl}
    return i


def drive(cmd: list[str], env: dict, cwd: Path, log: Path, state: dict) -> int:
    """Run heretic, answering its questions on stdin; its output goes to ``log``."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    segment = ""
    with log.open("w") as out:
        while chunk := os.read(proc.stdout.fileno(), 65536).decode(errors="replace"):
            out.write(chunk)
            out.flush()
            segment += chunk
            last = segment.rstrip(" ").rpartition("\n")[2]
            if last.endswith("Enter number:") or last.startswith("Path to the folder"):
                answer = heretic_answer(segment, state)
                out.write(f"<< {answer}\n")
                proc.stdin.write(f"{answer}\n".encode())
                proc.stdin.flush()
                segment = ""
    return proc.wait()


def run_heretic(args, dtype: str, prompts: dict[str, Path], work: Path) -> dict:
    """heretic from its own virtual environment, as a separate program, on the same
    prompts, budget, dtype and threads (``HERETIC_CHANGES``)."""
    if not args.heretic.is_file():
        return {"skipped": f"{args.heretic} not found: heretic not run (see benchmarks/README.md)"}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "config.toml").write_text(heretic_config(args, dtype, prompts))
    edited = work / "model"
    state = {"edited": str(edited)}
    # its notebook mode asks with input(), so that stdin can answer
    env = child_env(args.threads) | {"KAGGLE_KERNEL_RUN_TYPE": "batch", "PYTHONUNBUFFERED": "1"}
    report = work / "heretic.time"
    cmd = (
        [str(TIME), "-v", "-o", str(report), str(args.heretic)]
        if TIME.is_file()
        else [str(args.heretic)]
    )
    began = time.perf_counter()
    rc = drive(cmd, env, work, work / "heretic.log", state)
    result = {"rc": rc, "wall_s": time.perf_counter() - began, "log": str(work / "heretic.log")}
    result["peak_rss_mib"] = _peak(report)
    result["chosen"] = state.get("chosen")
    result["edited"] = str(edited) if (edited / "config.json").is_file() else None
    return result


def cached(path: Path, settings: dict, compute):
    """``compute()``, or what a run with the same settings wrote to ``path`` (JSON): a
    finished tool run or judgement is read again, not repeated (delete it to repeat it)."""
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("settings") == settings:
            print(f"reusing {path}")
            return record["result"]
    result = compute()
    if isinstance(result, dict) and (result.get("skipped") or result.get("rc")):
        return result  # not run, or failed: tried again next time
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "result": result}, indent=2) + "\n")
    return result


def judge_safety(args, edited: dict[str, str], work: Path) -> dict:
    """``eval safety``'s judging (refused / evasive / complied / broken, word salad scored
    under the unedited model) of every edit and the unedited model on the test split, in one
    run: the unedited model answers once. Returns each model's harmful and harmless rates."""
    from orthoedit.config import EvalSafetyConfig
    from orthoedit.judging.safety import run_safety
    from orthoedit.runtime.session import start_stage

    source = prompt_source(args.smoke)
    (first, model), *rest = edited.items()
    cfg = EvalSafetyConfig(
        model=model,
        base=str(args.model),
        out=work / "safety",
        harmful=source,
        harmless=source,
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    result = run_safety(cfg, None, print, start_stage(None), first, others=dict(rest))
    work.mkdir(parents=True, exist_ok=True)
    with (work / "answers.jsonl").open("w") as out:
        for answer in result.answers:
            role = first if answer.model == "model" else answer.model
            out.write(json.dumps({"model": role, **_answer(answer)}) + "\n")
    return {
        (first if role == "model" else role): {
            kind: result.summary[role][kind]["overall"] for kind in ("harmful", "harmless")
        }
        for role in result.summary
    }


def _answer(answer) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(answer).items() if k != "model"}


def judge_kl(args, edited: str, work: Path) -> dict:
    """``eval kl``: first-token KL and cross-entropy on the harmless test prompts."""
    from orthoedit.config import EvalKLConfig
    from orthoedit.evaluate.kl import eval_kl
    from orthoedit.prompts import prompt_texts

    harmless_test = work / "harmless-test.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    texts = prompt_texts(prompt_source(args.smoke), "harmless", "test")
    harmless_test.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    kl = eval_kl(
        EvalKLConfig(
            base=str(args.model),
            edited=edited,
            prompts=str(harmless_test),
            n=args.n or 10_000,
            batch_size=args.batch_size,
            dtype=args.dtype,
        ),
        log=lambda _: None,
    )
    return {
        "first_token_kl": kl.first_token_kl,
        "cross_entropy": {"base": kl.cross_entropy_base, "edited": kl.cross_entropy_edited},
    }


def judge_capability(args, edited: dict[str, str]) -> dict:
    """``eval bench``'s lm-eval run of the capability test (``--capability-task``, chat
    template on) on the unedited model once and on every edit, each edit compared with it
    (delta, the stderr of the delta)."""
    from dataclasses import asdict

    from orthoedit.config import EvalBenchConfig
    from orthoedit.evaluate.bench import compare, lm_eval_results

    cfg = EvalBenchConfig(
        base=str(args.model),
        edited=next(iter(edited.values())),
        out=args.out / "capability",
        tasks=[args.capability_task],
        limit=args.capability_limit,
        chat_template=True,
        dtype=args.dtype,
        offline=True,
    )
    raw = lm_eval_results(cfg, {"unedited": str(args.model), **edited}, cfg.tasks)
    return {
        name: [asdict(row) for row in compare(raw["unedited"], raw[name], cfg.max_drop, {})]
        for name in edited
    } | {"n_samples": raw["unedited"].get("n-samples")}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


ROWS = (
    ("harmful", "refusal", "harmful prompts refused"),
    ("harmful", "evasive", "harmful prompts evaded"),
    ("harmful", "complied", "harmful prompts complied"),
    ("harmful", "broken", "harmful answers broken"),
    ("harmless", "refusal", "harmless prompts refused"),
    ("harmless", "broken", "harmless answers broken"),
)


def markdown(results: dict) -> str:
    """One table: the unedited model and each tool's edit, judged alike."""
    judged = results.get("judged") or {}
    safety, kl = judged.get("safety") or {}, judged.get("kl") or {}
    tools = [t for t in results["tools"] if t in safety]
    cols = ["unedited", *tools]
    lines = [
        f"model {results['model']}, {results['trials']} trials each, dtype {results['dtype']}, "
        f"{results['threads']} threads; test split: {results['test_n']} prompts of each kind, "
        f"answers of {results['max_new_tokens']} tokens",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    models = ["base", *tools]
    for kind, key, label in ROWS:
        cells = [_pct(safety[m][kind][key]) if m in safety else "–" for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = ["0"] + [_num(kl.get(t, {}).get("first_token_kl"), ".4f") for t in tools]
    lines.append("| first-token KL (harmless test) | " + " | ".join(cells) + " |")
    capability = judged.get("capability")
    if capability:
        for i, row in enumerate(capability[tools[0]] if tools else []):
            name = f"{row['task']} {row['metric']}"
            cells = [_pct(row["base"])]
            for t in tools:
                r = capability[t][i]
                cells.append(f"{_pct(r['edited'])} ({100 * r['delta']:+.1f} ± "
                             f"{100 * (r['stderr'] or 0):.1f})")  # fmt: skip
            lines.append(
                f"| {name} (n={capability.get('n_samples')}) | " + " | ".join(cells) + " |"
            )
    for key, label in (("wall_s", "wall time (s)"), ("peak_rss_mib", "peak memory (MiB)")):
        cells = ["–"] + [_num(results["tools"][t]["run"].get(key), ".0f") for t in tools]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for tool, r in results["tools"].items():
        if r.get("skipped") or r.get("error"):
            lines += ["", f"{tool}: {r.get('skipped') or r.get('error')}"]
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    """Harmful prompts refused against first-token KL, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = results.get("judged") or {}
    safety, kl = judged.get("safety") or {}, judged.get("kl") or {}
    fig, ax = plt.subplots(figsize=(5, 4))
    points = [("unedited", 0.0, safety["base"]["harmful"]["refusal"])] if "base" in safety else []
    points += [
        (t, kl[t]["first_token_kl"], safety[t]["harmful"]["refusal"])
        for t in results["tools"]
        if t in safety and t in kl
    ]
    for label, x, refused in points:
        ax.scatter(x, 100 * refused, s=40)
        ax.annotate(label, (x, 100 * refused), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("first-token KL on harmless test prompts")
    ax.set_ylabel("harmful test prompts refused (%)")
    ax.set_title(f"{Path(results['model']).name}, {results['trials']} trials each")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    import torch

    from orthoedit.runtime.precision import resolve_dtype

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    choice = resolve_dtype(args.dtype, args.model)
    args.dtype = choice.dtype
    print(choice.note)
    limit = 32 if args.smoke else None  # orthoedit's n_train in a smoke run
    prompts = write_prompts(prompt_source(args.smoke), args.out / "inputs", limit)
    runs = {"model": str(args.model), "trials": args.trials, "dtype": args.dtype}
    runs |= {"startup_trials": args.startup_trials, "threads": args.threads}
    tools, edited = {}, {}
    for name, runner in (("orthoedit", run_orthoedit), ("heretic", run_heretic)):
        run = partial(runner, args, args.dtype, prompts, args.out / name)
        r = cached(args.out / f"run-{name}.json", runs, run)
        tools[name] = entry = {"run": r}
        if r.get("skipped"):
            print(f"{name}: {r['skipped']}")
            entry["skipped"] = r["skipped"]
            continue
        print(f"{name}: exit {r['rc']}, {r['wall_s']:.0f} s, peak {r['peak_rss_mib']} MiB")
        if r["edited"] is None:
            entry["error"] = f"{name} wrote no edited checkpoint (exit {r['rc']}; see {r['log']})"
            continue
        edited[name] = r["edited"]
    judged = {}
    if edited:
        work = args.out / "judged"
        tests = runs | {"n": args.n, "max_new_tokens": args.max_new_tokens, "edited": edited}
        judged["safety"] = cached(
            work / "safety.json", tests, lambda: judge_safety(args, edited, work)
        )
        judged["kl"] = {
            name: cached(work / f"kl-{name}.json", tests, partial(judge_kl, args, path, work))
            for name, path in edited.items()
        }
        if args.capability_task:
            bench = runs | {"task": args.capability_task, "limit": args.capability_limit}
            judged["capability"] = cached(
                work / "capability.json",
                bench | {"edited": edited},
                lambda: judge_capability(args, edited),
            )
    results = {
        "model": str(args.model),
        "trials": args.trials,
        "startup_trials": args.startup_trials,
        "dtype": args.dtype,
        "dtype_note": choice.note,
        "threads": args.threads,
        "test_n": args.n or "all",
        "max_new_tokens": args.max_new_tokens,
        "capability": {"task": args.capability_task, "limit": args.capability_limit},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "heretic_changes": HERETIC_CHANGES,
        "tools": tools,
        "judged": judged,
    }
    (args.out / "peers.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "peers.md").write_text(markdown(results))
    figure(results, args.out / "peers.png")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
