"""Benchmark ``orthoedit apply`` against a byte copy and against the full-load approach.

For each size, a synthetic Llama-shaped bf16 checkpoint is built (sharded safetensors + index +
config.json; random weights, hidden 2048, vocab 32000) and its files are read once so that they
sit in the page cache. Then, each in its own process, with the wall time measured from spawn
to exit and the process tree's RssAnon sampled every ~20 ms:

* ``copy``: ``benchmarks/byte_copy.py``, a Python copy of the folder through 64 MiB buffers;
* ``apply``: the installed ``orthoedit apply SRC --direction D --out OUT`` console script;
* ``full``: ``benchmarks/full_load.py``, ``from_pretrained`` -> orthogonalize in memory ->
  ``save_pretrained``, the approach of existing tools.

Start-up (interpreter + imports) is timed separately. The outputs of ``apply`` and ``full`` are
compared tensor by tensor as a sanity check that both made the same edit. Results are printed
as a Markdown table and written to ``benchmarks/results.json``.

Usage: ``.venv/bin/python benchmarks/bench_apply.py [--sizes 0.75,1.5] [--repeats 2]``;
``--smoke`` runs every kind once on a tiny checkpoint (hidden 64, a few layers, 3 shards) and
writes its results only to ``--results`` given (seconds; the test suite runs it, and with it
``byte_copy.py`` and ``full_load.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orthoedit.edit.ortho import unit
from orthoedit.model.direction import save_direction

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv's bin: python and the orthoedit console script
GIB = 1024**3
MIB = 1024**2
SAMPLE_S = 0.02
READ_BLOCK = 64 * MIB

# TinyLlama-1.1B-like shapes; only the number of layers changes with the size asked for.
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
HEAD_DIM = HIDDEN // HEADS

TARGETS = {
    "apply_over_copy_max": 2.0,
    "full_over_apply_min": 2.5,
    "apply_peak_rss_anon_mb_max": 600.0,
    "flat_peak_growth_max": 0.10,  # apply's peak may grow by at most 10% from smallest to largest
}


# --------------------------------------------------------------------------- checkpoint


def attention_tensors(p: str) -> list[tuple[str, tuple[int, ...]]]:
    """A decoder block's norms and attention (layer prefix ``p``)."""
    kv = KV_HEADS * HEAD_DIM
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
        (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
    ]


def llama_tensors(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM with untied embeddings, in order."""
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += attention_tensors(p)
        names += [
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return names


# Mixtral-like mixture of experts (--arch mixtral): 8 experts of intermediate 1408 per layer,
# stored one tensor per expert as the Hub's checkpoints are; every expert's w2 is edited.
EXPERTS, EXPERT_INTERMEDIATE = 8, 1408


def mixtral_tensors(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [*attention_tensors(p), (p + "block_sparse_moe.gate.weight", (EXPERTS, HIDDEN))]
        for e in range(EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            names += [
                (q + "w1.weight", (EXPERT_INTERMEDIATE, HIDDEN)),
                (q + "w2.weight", (HIDDEN, EXPERT_INTERMEDIATE)),
                (q + "w3.weight", (EXPERT_INTERMEDIATE, HIDDEN)),
            ]
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return names


TENSORS = {"llama": llama_tensors, "mixtral": mixtral_tensors}


def smoke_shapes() -> None:
    """--smoke: a Llama (or Mixtral) of hidden 64, small enough to build in a moment."""
    global HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM, EXPERT_INTERMEDIATE
    HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 64, 128, 256, 4, 2
    HEAD_DIM, EXPERT_INTERMEDIATE = HIDDEN // HEADS, 32


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * 2  # bf16


def layers_for(size_gib: float, arch: str = "llama") -> int:
    """Smallest layer count whose checkpoint holds at least ``size_gib`` GiB."""
    fixed = sum(nbytes(s) for _, s in TENSORS[arch](0))
    per_layer = sum(nbytes(s) for _, s in TENSORS[arch](1)) - fixed
    return max(1, math.ceil((size_gib * GIB - fixed) / per_layer))


def config_json(n_layers: int, arch: str = "llama") -> dict:
    moe = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": 2,
        "intermediate_size": EXPERT_INTERMEDIATE,
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        **(moe if arch == "mixtral" else {}),
        "num_hidden_layers": n_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_mib: int) -> list[list]:
    """Greedy split in model order into at least 3 shards of at most ~``shard_mib`` each."""
    total = sum(nbytes(s) for _, s in tensors)
    target = total / max(3, math.ceil(total / (shard_mib * MIB)))
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        if shards[-1] and size + nbytes(shape) > target * 1.001:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    return shards


def build_checkpoint(
    folder: Path, n_layers: int, shard_mib: int, seed: int = 0, arch: str = "llama"
) -> None:
    """Random bf16 weights (std 0.02, norms 1), one shard in memory at a time."""
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards = plan_shards(TENSORS[arch](n_layers), shard_mib)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16)
                for rows in torch.split(t, 4096):  # float32 scratch stays small
                    rows.copy_(torch.randn(rows.shape, generator=gen).mul_(0.02))
                tensors[name] = t
            weight_map[name] = fname
            total += nbytes(shape)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_json(n_layers, arch), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def ensure_checkpoint(work: Path, size_gib: float, shard_mib: int, arch: str = "llama") -> Path:
    n_layers = layers_for(size_gib, arch)
    folder = work / f"{arch}-{n_layers}L-bf16"
    try:
        ok = json.loads((folder / "config.json").read_text()) == config_json(n_layers, arch)
    except (OSError, ValueError):
        ok = False
    if not ok:
        t = time.perf_counter()
        print(f"building {folder.name} ({n_layers} layers) ...", file=sys.stderr, flush=True)
        build_checkpoint(folder, n_layers, shard_mib, arch=arch)
        print(f"  built in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm(folder: Path) -> float:
    """Read every file once so that it is in the page cache; returns the seconds it took."""
    t = time.perf_counter()
    buf = bytearray(READ_BLOCK)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with path.open("rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t


# --------------------------------------------------------------------------- measuring


def prefault(gib: float) -> None:
    """Touch ``gib`` GiB of fresh memory and free it again, just before a timed run.

    On a VM with free page reporting (virtio-balloon), memory left free for ~2 s is handed back
    to the host, and the next process to touch it pays a host fault per page: a byte copy of
    1.5 GiB then takes 2 s instead of 0.7 s, whichever run happens to follow a pause. Faulting
    the pages in here (freed to the kernel's free lists, not to the host) makes every run start
    from the same state.
    """
    if gib > 0:
        block = np.empty(int(gib * GIB), dtype=np.uint8)
        block[::4096] = 1
        del block


def status_kib(pid: int, keys: tuple[str, ...] = ("RssAnon:", "VmHWM:")) -> list[int]:
    """Fields of /proc/PID/status in KiB (0 once the process is gone)."""
    found = dict.fromkeys(keys, 0)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(None, 1)[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return list(found.values())


def tree_status_kib(pid: int) -> list[int]:
    """RssAnon and VmHWM summed over ``pid`` and its descendants."""
    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return [sum(col) for col in zip(*(status_kib(p) for p in pids), strict=True)]


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall time from spawn to exit, sampled peak RssAnon of its process tree.

    VmHWM (the kernel's peak resident set, which counts mmap'ed file pages too) is sampled as
    well; ``wait4``'s ru_maxrss is not used: it includes the parent's pages from before exec.
    """
    peak = [0, 0]
    done = threading.Event()
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def sample() -> None:
            while not done.is_set():
                peak[:] = map(max, peak, tree_status_kib(proc.pid))
                done.wait(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status = os.waitpid(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {
        "wall_s": round(wall, 3),
        "peak_rss_anon_mb": round(peak[0] / 1024, 1),
        "peak_vmhwm_mb": round(peak[1] / 1024, 1),  # includes mmap'ed file pages
    }


#: Start-up, timed alone: what ``apply`` imports, and what the full-load program imports.
STARTUP = {
    "python -c pass": "pass",
    "import torch, orthoedit.cli": "import torch, orthoedit.cli",
    "import orthoedit.cli, orthoedit.edit.apply": "import orthoedit.cli, orthoedit.edit.apply",
    "import torch, transformers.LlamaForCausalLM": (
        "import torch; from transformers import LlamaForCausalLM"
    ),
}


def time_startup(code: str, repeats: int = 5, fault_gib: float = 2) -> dict:
    """Median wall time of ``python -c code``, and the RssAnon it ends with."""
    runs, anon = [], 0
    report = "; print(next(x for x in open('/proc/self/status') if x.startswith('RssAnon')))"
    for _ in range(repeats):
        prefault(fault_gib)
        t = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", code + report], check=True, capture_output=True, text=True
        ).stdout
        runs.append(time.perf_counter() - t)
        anon = max(anon, int(out.split()[1]))
    return {"wall_s": round(statistics.median(runs), 3), "rss_anon_mb": round(anon / 1024, 1)}


def remove(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def commands(src: Path, direction: Path, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "copy": [py, str(HERE / "byte_copy.py"), str(src), str(out)],
        "apply": [str(BIN / "orthoedit"), "apply", str(src), "--direction", str(direction),
                  "--out", str(out)],
        "full": [py, str(HERE / "full_load.py"), str(src), str(direction), str(out)],
    }  # fmt: skip


# --------------------------------------------------------------------------- sanity check


def compare_outputs(a: Path, b: Path, n_layers: int, u: torch.Tensor) -> dict:
    """Tensor-by-tensor comparison of a few edited and unedited tensors of two checkpoints."""
    last = n_layers - 1
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.o_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",  # unedited
        "lm_head.weight",  # unedited
    ]
    axes = {names[0]: 1, names[1]: 0, names[2]: 0}
    report = {}
    for name in names:
        x, y = load_tensor(a, name).float(), load_tensor(b, name).float()
        diff = (x - y).abs()
        row = {
            "max_abs_diff": float(diff.max()),
            "max_abs_weight": float(x.abs().max()),
            "elements_differing": float((diff > 0).float().mean()),
        }
        if name in axes:  # ‖uᵀW‖/‖W‖ along the residual axis: what bf16 rounding leaves
            uu = u.float()
            for tag, w in (("apply", x), ("full", y)):
                proj = w @ uu if axes[name] == 1 else uu @ w
                row[f"residual_{tag}"] = float(proj.norm() / w.norm())
        report[name] = row
    return report


def load_tensor(folder: Path, name: str) -> torch.Tensor:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shard = folder / json.loads(index.read_text())["weight_map"][name]
    else:
        shard = folder / "model.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(name)


# --------------------------------------------------------------------------- driver


def ready(src: Path, args: argparse.Namespace, total: int) -> None:
    """Same starting state for every run: source cached, nothing dirty, free memory faulted in."""
    warm(src)
    os.sync()  # earlier outputs' dirty pages are not this run's writeback
    prefault(args.prefault_gib if args.prefault_gib >= 0 else total / GIB + 2)


def bench_size(args, size: float, direction: Path, u: torch.Tensor) -> dict:
    """Build (or reuse) the checkpoint of ``size`` GiB, time every kind of run, summarize."""
    src = ensure_checkpoint(args.work, size, args.shard_mib, args.arch)
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    total = folder_bytes(src)
    warm(src)
    read_s = warm(src)  # a second read: the files are cached now
    out = {k: args.work / f"out-{k}" for k in ("copy", "apply", "full")}
    remove(*out.values())
    for rep in range(args.warmup):  # untimed: first-touch costs, disk and import caches
        for kind in args.order:
            ready(src, args, total)
            measure(commands(src, direction, out[kind])[kind], args.work / f"{src.name}.log")
            remove(out[kind])
        print(f"  {src.name} warm-up round {rep} done", file=sys.stderr, flush=True)
    runs, check = timed_rounds(args, src, direction, out, total, n_layers, u)
    dry = dry_runs(args, src, direction, total) if "apply" in args.order else []
    result = {
        "size_gib": round(total / GIB, 3),
        "size_bytes": total,
        "n_layers": n_layers,
        "shards": len(list(src.glob("*.safetensors"))),
        "cached_read_s": round(read_s, 3),
        "runs": runs,
        "median": {k: median_run(v) for k, v in runs.items() if v},
        "apply_vs_full_check": check,
    }
    return summarize(result, dry)


def timed_rounds(args, src, direction, out, total, n_layers, u) -> tuple[dict, dict | None]:
    """``args.repeats`` rounds of every kind; the first round's outputs are compared."""
    runs: dict[str, list[dict]] = {k: [] for k in args.order}
    check = None
    for rep in range(args.repeats):
        for kind in args.order:
            ready(src, args, total)
            log = args.work / f"{src.name}.{kind}.{rep}.log"
            r = measure(commands(src, direction, out[kind])[kind], log)
            if kind == "full":
                with contextlib.suppress(ValueError, IndexError):
                    r["phases"] = json.loads(log.read_text().splitlines()[-1])
            runs[kind].append(r)
            print(f"  {src.name} {kind:5s} run {rep}: {r}", file=sys.stderr, flush=True)
            if kind == "copy" or rep > 0:
                remove(out[kind])
        if rep == 0 and {"apply", "full"} <= set(args.order):
            check = compare_outputs(out["apply"], out["full"], n_layers, u)
        remove(out["apply"], out["full"])
    return runs, check


def dry_runs(args, src: Path, direction: Path, total: int) -> list[float]:
    """``orthoedit apply --dry-run``: apply's fixed cost (start-up, headers, plan), no writing."""
    times = []
    for rep in range(args.repeats):
        ready(src, args, total)
        cmd = [str(BIN / "orthoedit"), "apply", str(src), "--direction", str(direction)]
        times.append(
            measure([*cmd, "--dry-run"], args.work / f"{src.name}.dry.{rep}.log")["wall_s"]
        )
    return times


def summarize(result: dict, dry: list[float]) -> dict:
    med = result["median"]
    if dry:
        result["apply_dry_run_s"] = round(statistics.median(dry), 3)
    if "copy" in med and "apply" in med:
        result["apply_over_copy"] = round(med["apply"]["wall_s"] / med["copy"]["wall_s"], 2)
        if dry:  # the streaming part alone: apply minus its dry run
            stream = med["apply"]["wall_s"] - result["apply_dry_run_s"]
            result["apply_stream_over_copy"] = round(stream / med["copy"]["wall_s"], 2)
    if "full" in med and "apply" in med:
        result["full_over_apply"] = round(med["full"]["wall_s"] / med["apply"]["wall_s"], 2)
    return result


def median_run(runs: list[dict]) -> dict:
    keys = ("wall_s", "peak_rss_anon_mb", "peak_vmhwm_mb")
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


def machine() -> dict:
    import transformers

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or _cpu_model(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "kernel": platform.release(),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def evaluate(sizes: list[dict]) -> dict:
    """Which targets were met (None when the runs needed were skipped)."""
    ok: dict[str, bool | None] = {}
    if all("apply_over_copy" in s for s in sizes):
        ok["apply_le_2x_copy"] = all(
            s["apply_over_copy"] <= TARGETS["apply_over_copy_max"] for s in sizes
        )
    if all("full_over_apply" in s for s in sizes):
        ok["full_ge_2.5x_apply"] = all(
            s["full_over_apply"] >= TARGETS["full_over_apply_min"] for s in sizes
        )
    peaks = [s["median"]["apply"]["peak_rss_anon_mb"] for s in sizes if "apply" in s["median"]]
    if peaks:
        ok["apply_peak_lt_600mb"] = max(peaks) < TARGETS["apply_peak_rss_anon_mb_max"]
    if len(peaks) > 1:
        ok["apply_peak_flat"] = max(peaks) / min(peaks) - 1 <= TARGETS["flat_peak_growth_max"]
    return ok


def markdown(result: dict) -> str:
    head = (
        "| size | layers / shards | copy s | apply s | full-load s | apply / copy "
        "| full / apply | apply --dry-run s | (apply - dry run) / copy "
        "| RssAnon copy | RssAnon apply | RssAnon full |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in result["sizes"]:
        m = s["median"]

        def cell(kind: str, key: str, fmt: str, m=m) -> str:
            return format(m[kind][key], fmt) if kind in m else "-"

        rows.append(
            f"| {s['size_gib']:.2f} GiB | {s['n_layers']} / {s['shards']} "
            f"| {cell('copy', 'wall_s', '.2f')} | {cell('apply', 'wall_s', '.2f')} "
            f"| {cell('full', 'wall_s', '.2f')} | {s.get('apply_over_copy', '-')}x "
            f"| {s.get('full_over_apply', '-')}x | {s.get('apply_dry_run_s', '-')} "
            f"| {s.get('apply_stream_over_copy', '-')}x "
            f"| {cell('copy', 'peak_rss_anon_mb', '.0f')} MB "
            f"| {cell('apply', 'peak_rss_anon_mb', '.0f')} MB "
            f"| {cell('full', 'peak_rss_anon_mb', '.0f')} MB |"
        )
    st = result["startup_s"]
    tail = "\n\nstart-up (median wall, RssAnon after): " + ", ".join(
        f"`{k}` {v['wall_s']:.2f} s / {v['rss_anon_mb']:.0f} MB" for k, v in st.items()
    )
    tail += "\ntargets: " + ", ".join(f"{k}: {v}" for k, v in result["targets_met"].items())
    return head + "\n".join(rows) + tail


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=HERE / "work", help="scratch folder")
    ap.add_argument("--sizes", default="0.75,1.5", help="checkpoint sizes in GiB, comma-separated")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each kind and size")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    ap.add_argument(
        "--prefault-gib",
        type=float,
        default=-1,
        help="memory to fault in before each run (default: size + 2 GiB; 0: off)",
    )
    ap.add_argument("--shard-mib", type=int, default=512, help="largest shard (>= 3 shards)")
    ap.add_argument("--order", default="copy,apply,full", help="which runs, in which order")
    ap.add_argument(
        "--arch",
        choices=("llama", "mixtral"),
        default="llama",
        help="dense Llama or Mixtral-like mixture of experts (use --order copy,apply)",
    )
    ap.add_argument(
        "--span",
        type=int,
        default=1,
        help="project out a span of this many directions (a [k, d] file; use --order copy,apply)",
    )
    ap.add_argument("--results", type=Path, default=None, help="default: results.json")
    ap.add_argument("--clean", action="store_true", help="also delete the source checkpoints")
    ap.add_argument("--smoke", action="store_true", help="a tiny checkpoint, every kind once")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_shapes()
        args.sizes, args.repeats, args.warmup, args.prefault_gib = "0.0003", 1, 0, 0
        args.shard_mib = 1
    elif args.results is None:
        args.results = HERE / "results.json"
    args.sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    args.order = [k.strip() for k in args.order.split(",") if k.strip()]
    if set(args.order) - {"copy", "apply", "full"}:
        ap.error("--order takes copy, apply and full")
    if args.span < 1 or (args.span > 1 and "full" in args.order):
        ap.error("--span takes k >= 1; the full-load baseline projects one direction only")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    if args.span == 1:
        r = torch.randn(HIDDEN, generator=gen)
        meta = {"source": "bench_apply"}
    else:
        r = torch.randn(args.span, HIDDEN, generator=gen)
        meta = {"source": "bench_apply", "kind": "span"}
    direction = save_direction(args.work / "direction.safetensors", r, meta)
    u = torch.from_numpy(unit(r.numpy())) if args.span == 1 else None
    if args.smoke:  # one start-up, not faulted in
        startup = {"python -c pass": time_startup("pass", repeats=1, fault_gib=0)}
    else:
        startup = {label: time_startup(code) for label, code in STARTUP.items()}
    sizes = []
    try:
        for size in args.sizes:
            sizes.append(bench_size(args, size, direction, u))
    finally:
        remove(*(args.work / f"out-{k}" for k in ("copy", "apply", "full")))
        if args.clean:
            remove(args.work)
    result = {
        "span": args.span,
        "machine": machine(),
        "startup_s": startup,
        "sample_interval_s": SAMPLE_S,
        "targets": TARGETS,
        "sizes": sizes,
    }
    result["targets_met"] = evaluate(sizes)
    result["markdown"] = markdown(result)
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
