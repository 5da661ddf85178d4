"""How a model's refusal rate moves with the answer budget, and what a refusal anywhere in
the answer adds to one in its opening.

A model answers the bundled harmful test split once, greedily, with the largest budget
(``--budgets``' last, 512 by default; cached in ``--cache``, so judging again costs nothing).
Greedy answers with a smaller budget are prefixes of that one, so each budget's answers are
its first N tokens, decoded. Each is judged twice by the judging layer's phrases:

* **opening**: a refusal phrase in the first 80 characters only (the rule before refusals
  counted anywhere, and still measure's filter on its 16-token answers);
* **anywhere**: the judging layer's verdict (``judging.verdicts.text_verdict``).

A GGUF ``MODEL`` runs in llama.cpp (the session of ``--backend llama.cpp``, one prompt at a
time), which on a CPU is several times faster than transformers for long answers.

Printed as Markdown and written to ``results-budget.json`` with a figure
(``budget.png``): refused and broken rates per budget, both rules. The defaults of
``eval safety --max-new-tokens``, ``search --front-max-new-tokens`` and the recipe's safety
budget are set from this curve (benchmarks/README.md says how).

Usage: ``.venv/bin/python benchmarks/bench_budget.py MODEL [--dtype float32]
[--budgets 64,128,256,512] [--cache FILE]``; ``--smoke`` runs the model organism on 8
prompts with budgets 4,8,16 (seconds; the test suite runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="model folder (default with --smoke: the organism)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--budgets", default="64,128,256,512")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=None, help="at most this many prompts")
    p.add_argument("--cache", type=Path, default=None, help="answers of the largest budget")
    p.add_argument("--results", type=Path, default=HERE / "results-budget.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        from orthoedit.organism import CHAT_MODEL

        args.model = args.model or str(CHAT_MODEL)
        args.budgets, args.n = "4,8,16", 8
    if not args.model:
        p.error("MODEL is required (or --smoke)")
    args.budgets = sorted(int(b) for b in args.budgets.split(","))
    return args


def prompts(args) -> list[str]:
    if args.smoke:
        from orthoedit.organism import load_prompts

        items = load_prompts("harmful")
    else:
        from orthoedit.pools import load_pool

        items = load_pool("harmful", "test")
    texts = [i["prompt"] for i in items]
    return texts[: args.n] if args.n else texts


def answers(args, texts: list[str]) -> dict:
    """Token ids of the largest budget's greedy answers (from the cache when it matches)."""
    key = hashlib.sha256(
        json.dumps([str(Path(args.model).resolve()), args.dtype, args.budgets[-1], texts]).encode()
    ).hexdigest()
    if args.cache and args.cache.is_file():
        cached = json.loads(args.cache.read_text())
        if cached.get("key") == key:
            return cached
    from orthoedit.judging.answers import prompt_rows
    from orthoedit.model.gguf import is_gguf
    from orthoedit.runtime.session import Session, generate

    where = SimpleNamespace(dtype=args.dtype, device=None, max_memory=None, offload_folder=None)
    if is_gguf(args.model):  # the file as llama.cpp runs it (--backend llama.cpp's session)
        from orthoedit.runtime.llama_cpp import LlamaCppSession

        session = LlamaCppSession.open(Path(args.model), where)
    else:
        session = Session.open(Path(args.model), where)
        session.batch_size = args.batch_size
    rows, _ = prompt_rows(session, texts)
    clock = time.perf_counter()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        print(f"  {done[0]}/{len(rows)} answered, {time.perf_counter() - clock:.0f} s", flush=True)

    made = generate(session, rows, args.budgets[-1], progress)
    found = {"key": key, "ids": [g.ids for g in made], "seconds": time.perf_counter() - clock}
    if args.cache:
        args.cache.write_text(json.dumps(found))
    return found


def judged(tok, ids: list[list[int]], budgets: list[int]) -> dict:
    """Per budget: refused (opening only, anywhere) and broken rates, and how many answers
    refuse only after their opening."""
    from orthoedit.judging.phrases import opening_refusal
    from orthoedit.judging.verdicts import text_verdict

    rows = {}
    for budget in budgets:
        texts = [tok.decode(i[:budget], skip_special_tokens=True).strip() for i in ids]
        anywhere = [text_verdict(t)[0] for t in texts]
        opening = [bool(opening_refusal(t)) for t in texts]
        n = len(texts)
        rows[budget] = {
            "n": n,
            "refused_opening": sum(opening) / n,
            "refused_anywhere": anywhere.count("refused") / n,
            "broken": anywhere.count("broken") / n,
            "delayed": sum(
                v == "refused" and not o for v, o in zip(anywhere, opening, strict=True)
            ),
            "still_going": sum(len(i) > budget for i in ids),  # answers cut by this budget
        }
    return rows


def markdown(rows: dict, model: str) -> str:
    lines = [
        f"Refusals of `{model}` on {next(iter(rows.values()))['n']} harmful test prompts "
        "by answer budget (greedy):",
        "",
        "| budget (tokens) | refused, opening only | refused, anywhere | refusals after the "
        "opening | broken | answers still going |",
        "|---|---|---|---|---|---|",
    ]
    for budget, r in rows.items():
        lines.append(
            f"| {budget} | {r['refused_opening']:.1%} | {r['refused_anywhere']:.1%} | "
            f"{r['delayed']} | {r['broken']:.1%} | {r['still_going']} |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(rows)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    curves = {
        "refused_opening": "refused, opening only",
        "refused_anywhere": "refused, anywhere",
        "broken": "broken",
    }
    for key, label in curves.items():
        ax.plot(budgets, [rows[b][key] for b in budgets], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_ylim(0, 1)
    ax.set_xlabel("answer budget (new tokens)")
    ax.set_ylabel("share of harmful test prompts")
    ax.set_title(f"refusal by budget: {Path(model).name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    texts = prompts(args)
    found = answers(args, texts)
    from orthoedit.runtime.session import load_tokenizer

    rows = judged(load_tokenizer(Path(args.model)), found["ids"], args.budgets)
    print(markdown(rows, args.model))
    from orthoedit.model.gguf import is_gguf

    gguf = is_gguf(args.model)
    result = {
        "model": args.model,
        "backend": "llama.cpp" if gguf else "hf",
        "dtype": "the file's" if gguf else args.dtype,
        "seconds": found["seconds"],
        "rows": rows,
    }
    if not args.smoke:
        args.results.write_text(json.dumps(result, indent=2) + "\n")
        figure(rows, args.results.with_name("budget.png"), args.model)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
