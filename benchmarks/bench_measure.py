"""Benchmark ``orthoedit measure``: where its time goes, and what it costs end to end.

In one process, on SmolLM2-135M-Instruct (``make smollm``) with the bundled prompt pools
(128 harmful + 128 harmless train prompts, 32 + 32 validation prompts, batch size 16):

* **capture overhead**: a plain forward pass of the decoder (no unembedding) against the
  capture pass of ``mean_activations`` (hooks on every block input, float64 sums), on the same
  length-sorted batches, interleaved, median of ``--repeats``;
* **padding**: padded tokens as a share of all tokens, batches in arrival order vs length-sorted
  (and the plain pass timed both ways);
* **selection**: one validation pass (first-token log-probs of the 64 validation prompts; with
  the shared template prefix run once, and without), against the time per candidate of the
  quick bypass (pruning) and of the full scores (ablated pass over all 64 + addition pass
  over the 32 harmless), as measured inside ``select``.

Then, each in its own process (wall time from spawn to exit, 2 cores):

* ``orthoedit measure`` on SmolLM2 with the defaults and ``--no-filter`` (it rarely refuses);
* the same on a **0.5B-shaped model** with random weights (Qwen2.5-0.5B's shapes: 24 layers,
  hidden 896, 14 heads / 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings) using
  SmolLM2's tokenizer and chat template, with ``--refusal-tokens I,Sorry`` since a random
  model has no refusals of its own. Random weights pass no filter, so that run ends with "no
  candidate passes" after doing all the work a real model's run does.
* the cost of the refusal filter on the 0.5B shape: greedy 16-token completions of 32 prompts,
  timed in process, from which the filter's share for a real model is estimated.

Results: printed as Markdown and written to ``benchmarks/results-measure.json``.

Usage: ``.venv/bin/python benchmarks/bench_measure.py [--model DIR] [--repeats 3] [--skip-0p5b]``;
``--smoke`` runs the in-process steps once on the model organism (16 + 16 train and 8 + 8
validation prompts), one end-to-end measure of it at a given layer and position, and the
generation of a 2-layer random model of its vocabulary in the 0.5B shape's place; it writes its
results only to ``--results`` given (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from orthoedit.judging.openings import parse_refusal_tokens
from orthoedit.measure.candidates import mean_activations
from orthoedit.measure.select import NoCandidateError, Scorer, select
from orthoedit.model.architectures import table_for_config
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.pools import load_pool
from orthoedit.runtime.scores import first_token_logprobs
from orthoedit.runtime.session import (
    batched_forward,
    chat_ids,
    greedy_completions,
    left_padded,
    length_sorted_batches,
    load_model,
    load_tokenizer,
    pad_id,
    post_instruction_ids,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
DEFAULT_MODEL = ROOT / "models" / "smollm2-135m-instruct"
BATCH = 16
QWEN_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
}
#: --smoke's end-to-end measure: few prompts, the choice given.
SMOKE = ("--n-train", "16", "--n-val", "8", "--layer", "2", "--position", "-1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TARGETS = {
    "capture_overhead_max": 0.10,
    "smollm_measure_s_max": 300.0,
    "half_b_measure_s_max": 900.0,
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="SmolLM2 folder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=HERE / "work")
    p.add_argument("--skip-0p5b", action="store_true", help="skip the 0.5B-shaped run")
    p.add_argument("--results", type=Path, default=None, help="default: results-measure.json")
    p.add_argument("--smoke", action="store_true", help="the organism, a few prompts, once")
    args = p.parse_args(argv)
    args.n_train, args.n_val, args.shape = 128, 32, QWEN_05B
    if args.smoke:
        from orthoedit.organism import CHAT_MODEL

        args.model, args.repeats, args.n_train, args.n_val = CHAT_MODEL, 1, 16, 8
        vocab = json.loads((CHAT_MODEL / "config.json").read_text())["vocab_size"]
        small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
        small |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab}
        args.shape = {**QWEN_05B, **small, "max_position_embeddings": 512}
    elif args.results is None:
        args.results = HERE / "results-measure.json"
    return args


def prompts(kind: str, split: str, n: int) -> list[str]:
    pool = [item["prompt"] for item in load_pool(kind, split)]
    return random.Random(0).sample(pool, len(pool))[:n]


def padding_share(lengths: list[int], batches: list[list[int]]) -> float:
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths) / slots


@torch.no_grad()
def plain_pass(model, rows, batches, pad) -> None:
    """The decoder over the given batches, whole rows (no shared prefix), no hooks."""
    base = model.base_model
    for batch in batches:
        base(**left_padded([rows[i] for i in batch], pad, "cpu"), use_cache=False)


def plain_pass_as_measured(model, rows, pad, n_pos) -> None:
    """The decoder exactly as ``mean_activations`` runs it (length-sorted, shared prefix run
    once), without the capture hooks."""
    for _ in batched_forward(model.base_model, rows, BATCH, pad, keep=n_pos):
        pass


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_process(args) -> dict:
    folder = args.model
    tok, model = load_tokenizer(folder), load_model(folder)
    config = json.loads((folder / "config.json").read_text())
    table = table_for_config(config)
    n_layers = model.config.num_hidden_layers
    post = post_instruction_ids(tok)
    pad = pad_id(tok)
    n = args.n_train
    train = chat_ids(
        tok, prompts("harmful", "train", n) + prompts("harmless", "train", n), post, None
    )
    lengths = [len(r) for r in train]
    arrival = [list(range(i, min(i + BATCH, len(train)))) for i in range(0, len(train), BATCH)]
    by_length = length_sorted_batches(lengths, BATCH)

    n_pos = len(post)
    runs = {
        "plain": lambda: plain_pass_as_measured(model, train, pad, n_pos),
        "capture": lambda: mean_activations(model, table, n_layers, train, n_pos, BATCH, pad),
        "whole_rows_sorted": lambda: plain_pass(model, train, by_length, pad),
        "whole_rows_arrival": lambda: plain_pass(model, train, arrival, pad),
    }
    runs["plain"]()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}

    # Selection on the validation prompts, with the candidates of the train prompts.
    half = len(train) // 2
    means = [
        mean_activations(model, table, n_layers, part, len(post), BATCH, pad)
        for part in (train[:half], train[half:])
    ]
    candidates = means[0] - means[1]
    harmful_val = chat_ids(tok, prompts("harmful", "val", args.n_val), post, None)
    harmless_val = chat_ids(tok, prompts("harmless", "val", args.n_val), post, None)
    both = harmful_val + harmless_val
    token_ids = parse_refusal_tokens(tok, "I,Sorry")
    import orthoedit.runtime.batching as runtime_module

    shared = runtime_module.MIN_SHARED_PREFIX
    runtime_module.MIN_SHARED_PREFIX = 10**9  # off: every row runs its whole prompt
    no_prefix = statistics.median(
        timed(lambda: first_token_logprobs(model, both, BATCH, pad)) for _ in range(args.repeats)
    )
    runtime_module.MIN_SHARED_PREFIX = shared
    with_prefix = statistics.median(
        timed(lambda: first_token_logprobs(model, both, BATCH, pad)) for _ in range(args.repeats)
    )
    try:
        scorer = Scorer(
            model=model,
            table=table,
            checkpoint=Checkpoint.open(folder),
            config=config,
            folder=folder,
            openings=[(t,) for t in token_ids],
            batch_size=BATCH,
            pad=pad,
        )
        selection = select(
            scorer, candidates, harmful_val, harmless_val, max_kl=0.1, max_layer_frac=0.8, top_k=20
        )
    except NoCandidateError as e:  # SmolLM2 rarely refuses: the timings are what matter here
        selection = e.selection
    t = selection.timings
    return {
        "model": str(folder),
        "train_prompts": len(train),
        "validation_prompts": len(both),
        "mean_tokens_per_prompt": statistics.mean(lengths),
        "forward_s": med,
        "forward_s_all": times,
        "capture_overhead": med["capture"] / med["plain"] - 1,
        "padding_share": {
            "arrival_order": padding_share(lengths, arrival),
            "length_sorted": padding_share(lengths, by_length),
        },
        "validation_pass_s": {"shared_prefix_once": with_prefix, "whole_prompts": no_prefix},
        "selection": t,
        "quick_per_candidate_s": t["quick_s"] / max(1, t["n_quick"]),
        "full_per_candidate_s": t["full_s"] / max(1, t["n_full"]),
    }


def run_measure(model: Path, out: Path, *extra: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "orthoedit"), "measure", str(model), "--out", str(out), "--no-filter"]
    start = time.perf_counter()
    done = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    wall = time.perf_counter() - start
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return {"wall_s": wall, "exit_code": done.returncode, "last_line": tail[0][:300]}


def build_half_b(smollm: Path, folder: Path, shape: dict = QWEN_05B) -> Path:
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    config = Qwen2Config(**shape)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="500MB")
    for name in TOKENIZER_FILES:
        if (smollm / name).exists():
            shutil.copy(smollm / name, folder / name)
    return folder


@torch.no_grad()
def generation_rate(folder: Path, n: int = 32) -> dict:
    tok, model = load_tokenizer(folder), load_model(folder)
    post = post_instruction_ids(tok)
    rows = chat_ids(tok, prompts("harmful", "train", n), post, None)
    pad = pad_id(tok)
    seconds = timed(lambda: greedy_completions(model, rows, BATCH, pad))
    return {"prompts": len(rows), "new_tokens": 16, "seconds": seconds}


def machine() -> dict:
    return {
        "cpus": len(__import__("os").sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def markdown(r: dict) -> str:
    p = r["in_process"]
    f = p["forward_s"]
    one = p["selection"]["validation_pass_s"]
    lines = [
        f"In process, {p['model'].split('/')[-1]}, {p['train_prompts']} train prompts "
        f"({p['mean_tokens_per_prompt']:.1f} tokens on average), batch size {BATCH}:",
        "",
        "| measurement | result |",
        "|---|---|",
        f"| plain forward pass, as `mean_activations` runs it, no hooks | {f['plain']:.2f} s |",
        f"| capture pass (`mean_activations`) | {f['capture']:.2f} s |",
        f"| capture overhead | {p['capture_overhead']:+.1%} |",
        f"| padded share of tokens, arrival order | {p['padding_share']['arrival_order']:.1%} "
        f"(whole rows: {f['whole_rows_arrival']:.2f} s) |",
        f"| padded share of tokens, length-sorted | {p['padding_share']['length_sorted']:.1%} "
        f"(whole rows: {f['whole_rows_sorted']:.2f} s) |",
        f"| one validation pass ({p['validation_prompts']} prompts), whole prompts | "
        f"{p['validation_pass_s']['whole_prompts']:.2f} s |",
        f"| one validation pass, shared template prefix run once | "
        f"{p['validation_pass_s']['shared_prefix_once']:.2f} s |",
        f"| quick bypass per candidate ({p['selection']['n_quick']} candidates) | "
        f"{p['quick_per_candidate_s']:.2f} s = "
        f"{p['quick_per_candidate_s'] / one:.2f} validation passes |",
        f"| full scores per candidate ({p['selection']['n_full']} candidates) | "
        f"{p['full_per_candidate_s']:.2f} s = "
        f"{p['full_per_candidate_s'] / one:.2f} validation passes |",
    ]
    lines += ["", "| end to end (own process) | wall | exit | last line |", "|---|---|---|---|"]
    for name, run in r["end_to_end"].items():
        lines.append(
            f"| {name} | {run['wall_s']:.0f} s ({run['wall_s'] / 60:.1f} min) | "
            f"{run['exit_code']} | {run['last_line'][:90]} |"
        )
    if "half_b_generation" in r:
        g = r["half_b_generation"]
        lines.append(
            f"\n0.5B shape: greedy {g['new_tokens']}-token completions of {g['prompts']} prompts "
            f"took {g['seconds']:.1f} s."
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} not found: run `make smollm` first (or pass --model).")
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "targets": TARGETS, "in_process": in_process(args)}
    if args.smoke:  # one short end-to-end run: the choice given, so no selection
        runs = {"organism, --no-filter": run_measure(args.model, args.work / "m-smol", *SMOKE)}
    else:
        runs = {"SmolLM2-135M-Instruct, --no-filter": run_measure(args.model, args.work / "m-smol")}
    if not args.skip_0p5b:
        shaped = "qwen2-tiny-shaped" if args.smoke else "qwen2.5-0.5b-shaped"
        half_b = build_half_b(args.model, args.work / shaped, args.shape)
        if not args.smoke:
            runs["0.5B-shaped (random), --no-filter --refusal-tokens I,Sorry"] = run_measure(
                half_b, args.work / "m-half-b", "--refusal-tokens", "I,Sorry"
            )
        result["half_b_generation"] = generation_rate(half_b, args.n_val)
    shutil.rmtree(args.work / "m-smol", ignore_errors=True)
    shutil.rmtree(args.work / "m-half-b", ignore_errors=True)
    result["end_to_end"] = runs
    result["markdown"] = markdown(result)
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
