"""Benchmark ``orthoedit export gguf`` on the development model: time and size per type, and
how far each GGUF's logits are from the edited safetensors checkpoint's.

The model (``make qwen``: Qwen2.5-Coder-0.5B-Instruct, bf16) is edited along a seeded random
unit direction (what is measured here is the conversion, not the edit), then exported once
per type, each in its own ``orthoedit export gguf`` process (the first run converts the BF16
file the quantizer starts from; a type exported by an earlier run is not exported again). Each
GGUF is then run on the same chat-templated prompts,
next to the edited safetensors checkpoint in transformers (float32):

* ``hf``: the GGUF loaded by transformers (``gguf_file=``, dequantized to float32);
* ``llama.cpp``: the GGUF run by llama.cpp itself (llama-cpp-python, all logits), the runtime
  the file is for.

Reported per type: max |Δlogit| over every prompt position, the same relative to the largest
|logit|, mean KL(edited ‖ GGUF) of the next-token distributions, and how often the argmax token
agrees. Needs llama.cpp's converter (``--llama-cpp`` or ``$ORTHOEDIT_LLAMA_CPP``, else the
pinned sdist is fetched once), sentencepiece and llama-cpp-python.

Usage: ``.venv/bin/python benchmarks/bench_export.py [--types BF16,Q8_0,Q4_K_M] [--model DIR]``;
results go to ``benchmarks/results-export.json``. ``--smoke`` exports the tests' tiny Llama as
F32 with their stand-in converter (``tests/fake_llama_cpp``, which lays out the checkpoint's
own tensors as llama.cpp's converter does) unless ``$ORTHOEDIT_LLAMA_CPP`` names another, and
writes its results only to ``--results`` given (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct"
PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain the difference between a process and a thread in two sentences.",
    "How do I pick a lock?",
]


def tiny_llama(work: Path) -> Path:
    """--smoke: the tests' tiny Llama (a BPE tokenizer, as the stand-in converter needs)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import build_tiny_model

    folder = work / "tiny-llama"
    return folder if (folder / "config.json").is_file() else build_tiny_model("llama", folder)


def edit(model: Path, work: Path) -> Path:
    """The development model edited along a seeded random unit direction."""
    from orthoedit.model.direction import save_direction

    out = work / "edited"
    if (out / "plan.json").is_file():
        return out
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    d = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    direction = save_direction(work / "direction.safetensors", d / d.norm(), {"source": "bench"})
    cli = [sys.executable, "-m", "orthoedit.cli", "apply", str(model)]
    subprocess.run([*cli, "--direction", str(direction), "--out", str(out)], check=True)
    return out


def export(edited: Path, types: list[str]) -> dict[str, dict]:
    """Each type in its own export process: wall time and size."""
    found = {}
    for kind in types:
        out = edited.parent / f"gguf-{kind}"
        done = out / "timing.json"
        if done.is_file():  # exported by an earlier run: its time is kept
            found[kind] = json.loads(done.read_text())
            continue
        began = time.perf_counter()
        cli = [sys.executable, "-m", "orthoedit.cli", "export", "gguf", str(edited)]
        cli += ["--type", kind, "--out", str(out), "--overwrite"]
        subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - began
        (path,) = out.glob("*.gguf")
        found[kind] = {
            "file": str(path),
            "seconds": round(seconds, 1),
            "bytes": path.stat().st_size,
        }
        print(f"{kind}: {seconds:.1f} s, {path.stat().st_size / 1e6:,.1f} MB", flush=True)
    return found


def token_rows(edited: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(edited)
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_logits(folder: Path, rows, gguf_file: str | None = None) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return [model(torch.tensor([r])).logits[0].numpy() for r in rows]


def llama_logits(path: Path, rows) -> list[np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=os.cpu_count())
    found = []
    for r in rows:
        llm.reset()
        llm.eval(r)
        found.append(np.array(llm.scores[: len(r)], dtype=np.float32))
    return found


def distance(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    a, b = np.concatenate(ref), np.concatenate(got)
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = (np.exp(la) * (la - lb)).sum(-1)
    diff = float(np.abs(a - b).max())
    return {
        "max_dlogit": diff,
        "relative": diff / float(np.abs(a).max()),
        "mean_kl": float(kl.mean()),
        "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="BF16,F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "export")
    parser.add_argument("--results", type=Path, default=None, help="default: results-export.json")
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny Llama, F32, stand-in converter"
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.types = tiny_llama(args.work), "F32"
        os.environ.setdefault("ORTHOEDIT_LLAMA_CPP", str(ROOT / "tests" / "fake_llama_cpp"))
    elif args.results is None:
        args.results = ROOT / "benchmarks" / "results-export.json"
    args.work.mkdir(parents=True, exist_ok=True)
    edited = edit(args.model, args.work)
    files = export(edited, args.types.split(","))
    rows = token_rows(edited)
    ref = hf_logits(edited, rows)
    results = {}
    for kind, info in files.items():
        path = Path(info["file"])
        results[kind] = {
            **info,
            "hf": distance(ref, hf_logits(path.parent, rows, path.name)),
            "llama.cpp": distance(ref, llama_logits(path, rows)),
        }
        print(kind, json.dumps({k: results[kind][k] for k in ("hf", "llama.cpp")}), flush=True)
    record = {
        "model": args.model.name,
        "positions": sum(len(r) for r in rows),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "results": results,
    }
    if args.results is not None:
        args.results.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
