"""Every model-running command on a GPU, checked against the CPU, on the model organism.

For a machine with CUDA (a GPU check; the CPU tests never need one). Each command runs as a
user would run it (``python -m orthoedit.cli ...``, timed from spawn to exit, start-up
included), on the shipped organism and its prompts:

1. ``measure`` on the CPU in float32 (the reference), with ``--device cuda`` in float32 and in
   bfloat16: the candidates (every layer x position difference of means) against the
   reference, relative error of each candidate, and the chosen layer and position;
2. ``search --device cuda`` (``--trials``) from the CUDA float32 measure;
3. ``apply`` of the chosen edit, ``verify`` (the edited checkpoint against the plan's hooks);
4. ``eval kl``, ``eval safety`` (with the organism's guard as judge), ``compare``, ``study
   sites`` and ``attribute`` with ``--device cuda``, each beside the same command on the CPU:
   their numbers must agree to float32 noise (first-token KL, refusal and unsafe rates,
   refusal log-odds).

Writes ``benchmarks/results-device.json`` (or ``--results``): the versions, the device, each
run's command, seconds and exit code, and the comparisons. Exit 1 when a command fails or a
comparison is outside its tolerance.

Usage: ``python benchmarks/bench_device.py [--work DIR] [--trials 12]``; ``--smoke`` checks
the CPU against itself through the same code with the fewest commands (measure at a given layer
and position, apply, eval kl; no GPU needed, the test suite runs it) and writes its results
only to ``--results`` given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from orthoedit.folders import MeasureFolder, ReportFolder, SearchFolder

ROOT = Path(__file__).resolve().parents[1]
ORGANISM = ROOT / "src" / "orthoedit" / "organism"
MODEL = ORGANISM / "chat"
GUARD = ORGANISM / "guard"
PROMPTS = ORGANISM / "prompts"

#: float32 on two devices sums in other orders: candidates agree to this relative error.
CANDIDATE_RTOL_F32 = 1e-4
#: bfloat16 keeps 8 bits of mantissa: a candidate's relative error stays under this.
CANDIDATE_RTOL_BF16 = 0.1
#: rates and KLs from the two devices (float32) agree to this.
NUMBER_ATOL = 1e-3


def run(name: str, args: list, runs: list) -> float:
    """One command, timed; its record goes to ``runs``."""
    command = [sys.executable, "-m", "orthoedit.cli", *map(str, args)]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    seconds = time.perf_counter() - began
    runs.append(
        {
            "name": name,
            "args": list(map(str, args)),
            "seconds": round(seconds, 2),
            "exit": done.returncode,
            "stderr": done.stderr[-1500:] if done.returncode else "",
        }
    )
    print(f"{name}: exit {done.returncode}, {seconds:.1f} s", flush=True)
    if done.returncode:
        print(done.stderr[-3000:], flush=True)
    return seconds


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ‖a − b‖ / ‖b‖ over the candidates (last axis)."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


def measured(folder: Path) -> dict:
    found = MeasureFolder(folder)
    record = found.read_record()
    return {
        "layer": record.get("layer"),
        "position": record.get("position"),
        "candidates": load_file(found.candidates)["candidates"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/orthoedit-device"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU")
    parser.add_argument("--results", type=Path, default=None, help="default: results-device.json")
    parser.add_argument("--smoke", action="store_true", help="the CPU against itself, briefly")
    args = parser.parse_args()
    if args.smoke:
        args.device = "cpu"
    elif args.results is None:
        args.results = ROOT / "benchmarks" / "results-device.json"
    gpu = args.device
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    w, runs, checks = args.work, [], {}
    w.mkdir(parents=True, exist_ok=True)
    direction = measure_and_search(args, w, gpu, runs, checks)
    edit_and_evaluate(args, w, gpu, direction, runs)
    compare_devices(w, checks, args.smoke)
    verify = json.loads((w / "verify.json").read_text()) if (w / "verify.json").is_file() else {}
    result = {
        "device": torch.cuda.get_device_name() if gpu.startswith("cuda") else gpu,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "runs": runs,
        "checks": checks,
        "verify_passed": verify.get("passed"),
    }
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=2, default=str) + "\n")
    failed = [r["name"] for r in runs if r["exit"] not in (0,)]
    for name, c in checks.items():
        bad = "error" in c or c.get("max_abs_diff", 0) > c.get("tolerance", 1)
        bad = bad or c.get("max_relative_error", 0) > c.get("tolerance", 1)
        if bad:
            failed.append(name)
        print(f"{name}: {json.dumps(c, default=str)[:400]}")
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


def measure_and_search(args, w: Path, gpu: str, runs: list, checks: dict) -> Path:
    """measure on the CPU and the device (float32, and bfloat16 unless --smoke), compared;
    then search on the device (unless --smoke). Returns the direction to edit with."""
    data = [
        "--harmful",
        PROMPTS / "harmful-train.jsonl",
        "--harmless",
        PROMPTS / "harmless-train.jsonl",
    ]
    tags = {
        "cpu-f32": [],
        "cuda-f32": ["--device", gpu],
        "cuda-bf16": ["--device", gpu, "--dtype", "bfloat16"],
    }
    if args.smoke:  # the choice given, no filter: the candidates are still every one
        data += ["--layer", 2, "--position", -1, "--no-filter", "--n-train", 16, "--n-val", 8]
        del tags["cuda-bf16"]
    for tag, extra in tags.items():
        run(
            f"measure {tag}",
            [
                "measure",
                MODEL,
                "--out",
                w / f"m-{tag}",
                "--max-kl",
                0.2,
                *data,
                *extra,
                "--overwrite",
            ],
            runs,
        )
    ref = measured(w / "m-cpu-f32")
    for tag, rtol in (("cuda-f32", CANDIDATE_RTOL_F32), ("cuda-bf16", CANDIDATE_RTOL_BF16)):
        if tag not in tags:
            continue
        got = measured(w / f"m-{tag}")
        checks[f"measure {tag} vs cpu-f32"] = {
            "max_relative_error": relative(got["candidates"], ref["candidates"]),
            "tolerance": rtol,
            "same_choice": (got["layer"], got["position"]) == (ref["layer"], ref["position"]),
            "choice": [got["layer"], got["position"]],
            "reference_choice": [ref["layer"], ref["position"]],
        }
    if not args.smoke:
        run(
            "search cuda",
            [
                "search",
                MODEL,
                "--candidates",
                w / "m-cuda-f32",
                "--out",
                w / "s",
                "--trials",
                args.trials,
                "--startup-trials",
                6,
                "--max-kl",
                0.2,
                "--device",
                gpu,
                "--overwrite",
            ],
            runs,
        )
    return w / "s"


def edit_and_evaluate(args, w: Path, gpu: str, searched: Path, runs: list) -> None:
    """apply the chosen edit (measure's direction without one), verify it, and run every
    evaluation and research command on the CPU and the device (eval kl only with --smoke)."""
    chosen = SearchFolder(searched).chosen
    direction = chosen.direction
    if not direction.is_file():  # no trial within the budget: edit measure's direction
        direction = MeasureFolder(w / "m-cuda-f32").direction
    scales = ["--scales", chosen.scales] if chosen.scales.is_file() else []
    run(
        "apply",
        ["apply", MODEL, "--direction", direction, *scales, "--out", w / "edited", "--overwrite"],
        runs,
    )
    if not args.smoke:
        run(
            "verify",
            ["verify", MODEL, w / "edited", "--report", w / "verify.json", "--overwrite"],
            runs,
        )
    edited, harmless = w / "edited", PROMPTS / "harmless-test.jsonl"
    research = ["--direction", direction, "--harmful", PROMPTS / "harmful-test.jsonl"]
    research += ["--harmless", harmless, "--n", 32]
    organism = ["--harmful", "organism", "--harmless", "organism", "--n", 64]
    for device in ("cpu", "cuda"):
        commands = {
            "eval kl": ["eval", "kl", MODEL, edited, "--prompts", harmless, "--report",
                        w / f"kl-{device}.json", *(["--n", 16] if args.smoke else [])],
            "eval safety": ["eval", "safety", edited, "--base", MODEL, *organism,
                            "--max-new-tokens", 64, "--judge", f"hf:{GUARD}", "--out",
                            w / f"safety-{device}"],
            "compare": ["compare", MODEL, edited, "--prompts", "organism", "--report",
                        w / f"compare-{device}.md"],
            "study sites": ["study", "sites", MODEL, *research, "--out", w / f"sites-{device}"],
            "attribute": ["attribute", MODEL, *research, "--top", 5, "--out",
                          w / f"attr-{device}"],
        }  # fmt: skip
        if args.smoke:
            commands = {"eval kl": commands["eval kl"]}
        on = ["--device", "cpu" if device == "cpu" else gpu, "--overwrite"]
        for name, args_ in commands.items():
            run(f"{name} {device}", [*args_, *on], runs)


def compare_devices(w: Path, checks: dict, smoke: bool) -> None:
    """Each command's numbers on the CPU beside the device's (absent ones: an error)."""

    def pair(name: str, read) -> None:
        try:
            cpu, cuda = read("cpu"), read("cuda")
        except (OSError, KeyError, ValueError) as e:
            checks[name] = {"error": repr(e)}
            return
        checks[name] = {
            "cpu": cpu,
            "cuda": cuda,
            "max_abs_diff": max(abs(a - b) for a, b in zip(cpu, cuda, strict=True)),
            "tolerance": NUMBER_ATOL,
        }

    pair("eval kl", lambda d: [json.loads((w / f"kl-{d}.json").read_text())["first_token_kl"]])
    if smoke:  # eval kl only
        return
    pair(
        "eval safety",
        lambda d: [
            json.loads(ReportFolder(w / f"safety-{d}").json.read_text())["summary"][r][k][
                "overall"
            ][m]
            for r in ("base", "model")
            for k in ("harmful", "harmless")
            for m in ("refusal", "broken")
        ],
    )
    pair(
        "study sites",
        lambda d: [
            v
            for o in json.loads((w / f"sites-{d}" / "sites.json").read_text())["conditions"]
            if o["log_odds"] is not None
            for v in (o["log_odds"], o["refusal"], o["kl"])
        ],
    )
    pair(
        "attribute",
        lambda d: [
            c["estimate"]
            for c in json.loads((w / f"attr-{d}" / "attribution.json").read_text())["components"]
        ][:20],
    )


if __name__ == "__main__":
    sys.exit(main())
