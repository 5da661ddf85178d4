"""Benchmark ``orthoedit apply MODEL.gguf --out EDITED.gguf`` against a byte copy of the file.

The source is a synthetic Llama GGUF with TinyLlama shapes (hidden 2048, intermediate 5632,
vocabulary 32000, untied), random weights in one type (Q8_0 by default), written with the gguf
package. Runs, interleaved, each in its own process, the file in the page cache:

* ``copy``: ``byte_copy.py`` of the folder holding the file (every byte through user space);
* ``apply``: the installed ``orthoedit apply SRC.gguf --direction D --out OUT.gguf``.

Wall time and peak RssAnon (bench_apply.py's ``measure``); medians over ``--repeats``. Results
go to ``results-gguf.json``. Usage:
``.venv/bin/python benchmarks/bench_gguf.py [--layers 8] [--type Q8_0] [--repeats 3]``;
``--smoke`` runs once, after no warm-up, on a 2-layer file of hidden 256, and writes its results
only to ``--results`` given (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apply import BIN, HERE, machine, measure, prefault, warm
from orthoedit.edit import gguf_types
from orthoedit.model.direction import save_direction

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
HEAD = HIDDEN // HEADS


def smoke_shapes() -> None:
    """--smoke: hidden 256 (K-quants pack rows in blocks of 256)."""
    global HIDDEN, INTER, VOCAB, HEADS, KV_HEADS, HEAD
    HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 256, 256, 256, 4, 2
    HEAD = HIDDEN // HEADS


def tensors(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape [out, in]) in llama.cpp's order."""
    out = [("token_embd.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (HIDDEN,)),
            (b + "attn_q.weight", (HIDDEN, HIDDEN)),
            (b + "attn_k.weight", (KV_HEADS * HEAD, HIDDEN)),
            (b + "attn_v.weight", (KV_HEADS * HEAD, HIDDEN)),
            (b + "attn_output.weight", (HIDDEN, HIDDEN)),
            (b + "ffn_norm.weight", (HIDDEN,)),
            (b + "ffn_gate.weight", (INTER, HIDDEN)),
            (b + "ffn_up.weight", (INTER, HIDDEN)),
            (b + "ffn_down.weight", (HIDDEN, INTER)),
        ]
    return [*out, ("output_norm.weight", (HIDDEN,)), ("output.weight", (VOCAB, HIDDEN))]


def build(path: Path, n_layers: int, kind: str) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", n_layers), ("embedding_length", HIDDEN),
                       ("feed_forward_length", INTER), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("context_length", 2048),
                       ("rope.dimension_count", HEAD), ("vocab_size", VOCAB)):  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    qtype = gguf.GGMLQuantizationType[kind]
    for name, shape in tensors(n_layers):
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
            continue
        rows = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name, rows, np.dtype(np.uint8), int(np.prod(rows)), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape in tensors(n_layers):
        values = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        data = gguf_types.quantize(values, kind)
        writer.write_tensor_data(np.ascontiguousarray(data))
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--type", default="Q8_0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefault-gib", type=float, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="default: results-gguf.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny file, once")
    args = parser.parse_args()
    if args.smoke:
        smoke_shapes()
        args.layers, args.repeats, args.prefault_gib = 2, 1, 0
    elif args.results is None:
        args.results = HERE / "results-gguf.json"
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    model = src / f"llama-{args.layers}l-{args.type}.gguf"
    if not model.exists():
        build(model, args.layers, args.type)
    seeded = torch.Generator().manual_seed(0)
    direction = save_direction(
        work / "direction.safetensors", torch.randn(HIDDEN, generator=seeded)
    )
    size = model.stat().st_size
    prefault_gib = args.prefault_gib if args.prefault_gib is not None else size / 2**30 + 1
    runs: dict[str, list[dict]] = {"copy": [], "apply": []}
    warmup = 0 if args.smoke else 1
    for round_ in range(1 - warmup, args.repeats + 1):  # the first round warms up, untimed
        for name in runs:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            warm(src)
            prefault(prefault_gib)
            if name == "copy":
                cmd = [sys.executable, str(HERE / "byte_copy.py"), str(src), str(out)]
            else:
                out.mkdir()
                cmd = [str(BIN / "orthoedit"), "apply", str(model), "--direction",
                       str(direction), "--out", str(out / "edited.gguf")]  # fmt: skip
            result = measure(cmd, work / f"{name}.log")
            if round_:
                runs[name].append(result)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    result = {
        "machine": machine(),
        "file": {"layers": args.layers, "type": args.type, "bytes": size},
        "llama_cpp_quantizer": gguf_types.ggml() is not None,
        "workers": __import__("orthoedit.edit.gguf_write", fromlist=["WORKERS"]).WORKERS,
        "runs": runs,
        "median_s": med,
        "apply_over_copy": round(med["apply"] / med["copy"], 2),
        "apply_peak_rss_anon_mb": max(r["peak_rss_anon_mb"] for r in runs["apply"]),
    }
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("file", "median_s", "apply_over_copy",
                                             "apply_peak_rss_anon_mb")}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
