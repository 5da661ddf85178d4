"""Benchmark generation and judging for ``orthoedit eval safety``.

On the model organism (float32, 2 CPU cores), with its 480 harmful + harmless test prompts and
the default budget of 256 new tokens (the organism ends its answers itself):

* **batched generation** (``judging.answers.answer_prompts``, length-sorted batches of 32) against
  **one prompt at a time** (batch size 1) on the same prompts: prompts per second, the
  speed-up, and how many answers are identical (greedy decoding, so they should all be);
* **judge throughput**: the organism guard as an ``hf:`` judge on those 480 (request, answer)
  pairs, in verdicts per second, batched (32) and one at a time.

Medians of ``--repeats`` runs, interleaved. Results: printed as Markdown and written to
``benchmarks/results-generate.json``.

Usage: ``.venv/bin/python benchmarks/bench_generate.py [--repeats 3] [--batch-size 32]``;
``--smoke`` runs once on 4 + 4 prompts with a budget of 8 tokens and writes its results only to
``--results`` given (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from orthoedit.judging.answers import answer_prompts
from orthoedit.judging.judges import HFJudge
from orthoedit.organism import CHAT_MODEL, GUARD_MODEL, load_prompts
from orthoedit.runtime.session import Placement, Session, load_model, load_tokenizer, pad_id

HERE = Path(__file__).resolve().parent
BUDGET = 256
TARGET_SPEEDUP = 4.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--results", type=Path, default=None, help="default: results-generate.json")
    p.add_argument("--smoke", action="store_true", help="4 + 4 prompts, 8 tokens, once")
    args = p.parse_args(argv)
    args.n, args.budget = (4, 8) if args.smoke else (None, BUDGET)
    if args.smoke:
        args.repeats, args.batch_size = 1, 4
    elif args.results is None:
        args.results = HERE / "results-generate.json"
    return args


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv=None) -> dict:
    args = parse_args(argv)
    tok, model = load_tokenizer(CHAT_MODEL), load_model(CHAT_MODEL)
    prompts = [
        i["prompt"] for kind in ("harmful", "harmless") for i in load_prompts(kind)[: args.n]
    ]
    judge_batched = HFJudge(GUARD_MODEL, Placement(), args.batch_size)
    judge_single = HFJudge(GUARD_MODEL, Placement(), 1)

    def generate(batch_size):
        session = Session(CHAT_MODEL, model, tok, None, batch_size, [], pad_id(tok))
        return answer_prompts(session, prompts, max_new_tokens=args.budget)

    times: dict[str, list[float]] = {
        "batched": [],
        "single": [],
        "judge_batched": [],
        "judge_single": [],
    }
    answers = {}
    for _ in range(args.repeats):
        seconds, answers["batched"] = timed(lambda: generate(args.batch_size))
        times["batched"].append(seconds)
        seconds, answers["single"] = timed(lambda: generate(1))
        times["single"].append(seconds)
        pairs = [(j.prompt, j.completion) for j in answers["batched"]]
        for name, judge in (("judge_batched", judge_batched), ("judge_single", judge_single)):
            times[name].append(timed(lambda j=judge, p=pairs: j(p))[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    same = sum(
        a.completion == b.completion
        for a, b in zip(answers["batched"], answers["single"], strict=True)
    )
    n = len(prompts)
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "prompts": n,
        "budget": args.budget,
        "batch_size": args.batch_size,
        "seconds": med,
        "seconds_all": times,
        "prompts_per_s": {"batched": n / med["batched"], "single": n / med["single"]},
        "speedup": med["single"] / med["batched"],
        "identical_answers": same,
        "verdicts_per_s": {
            "batched": n / med["judge_batched"],
            "single": n / med["judge_single"],
        },
        "target_speedup": TARGET_SPEEDUP,
    }
    result["markdown"] = markdown(result)
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    return result


def markdown(r: dict) -> str:
    s, pps, vps = r["seconds"], r["prompts_per_s"], r["verdicts_per_s"]
    return "\n".join(
        [
            f"Organism, {r['prompts']} prompts, at most {r['budget']} new tokens, float32, "
            f"{r['machine']['torch_threads']} threads:",
            "",
            "| run | time | throughput |",
            "|---|---|---|",
            f"| generation, batches of {r['batch_size']} | {s['batched']:.2f} s | "
            f"{pps['batched']:.0f} prompts/s |",
            f"| generation, one prompt at a time | {s['single']:.2f} s | "
            f"{pps['single']:.0f} prompts/s |",
            f"| **speed-up** (target ≥ {r['target_speedup']:g}×) | **{r['speedup']:.1f}×** | "
            f"{r['identical_answers']} of {r['prompts']} answers identical |",
            f"| guard judge, batches of {r['batch_size']} | {s['judge_batched']:.2f} s | "
            f"{vps['batched']:.0f} verdicts/s |",
            f"| guard judge, one at a time | {s['judge_single']:.2f} s | "
            f"{vps['single']:.0f} verdicts/s |",
        ]
    )


if __name__ == "__main__":
    main()
