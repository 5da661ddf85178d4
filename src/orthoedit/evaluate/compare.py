"""Side by side: both models' greedy answers to the same prompts (``orthoedit compare``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..config import CompareConfig
from ..judging.answers import answer_prompts
from ..model.source import resolve_model
from ..output import check_file_target, inputs_of, write_file
from ..runtime.session import start_stage
from ..runtime.vllm_engine import open_session, resolved


@dataclass
class Pair:
    prompt: str
    kind: str
    base: str
    base_verdict: str
    edited: str
    edited_verdict: str


def _prompts(cfg: CompareConfig) -> list[tuple[str, str]]:
    """(prompt, kind) pairs; kind is harmful / harmless for the bundled and organism sets."""
    from ..prompts import BUNDLED, ORGANISM, prompt_texts

    rng = random.Random(cfg.seed)
    if cfg.prompts in (None, BUNDLED, ORGANISM):
        harmful = prompt_texts(cfg.prompts, "harmful", "test")
        harmless = prompt_texts(cfg.prompts, "harmless", "test")
        n_harmful = (cfg.n + 1) // 2
        return [(p, "harmful") for p in rng.sample(harmful, min(n_harmful, len(harmful)))] + [
            (p, "harmless") for p in rng.sample(harmless, min(cfg.n - n_harmful, len(harmless)))
        ]
    items = prompt_texts(cfg.prompts, column=cfg.column, split=cfg.split)
    return [(p, "") for p in rng.sample(items, min(cfg.n, len(items)))]


def compare(cfg: CompareConfig, log: Callable[[str], None] = print) -> list[Pair]:
    start_stage(cfg.device)
    check_file_target(cfg.report, inputs_of(cfg), cfg.overwrite)
    cfg = resolved(cfg, log)
    folders = {
        name: resolve_model(m, None)[0] for name, m in (("base", cfg.base), ("edited", cfg.edited))
    }
    prompts = _prompts(cfg)
    answers = {}
    for name, folder in folders.items():
        log(f"{name}: {len(prompts)} prompts, at most {cfg.max_new_tokens} tokens each")
        session = open_session(folder, cfg)
        answers[name] = answer_prompts(
            session, [p for p, _ in prompts], max_new_tokens=cfg.max_new_tokens
        )
        session.close()
    pairs = [
        Pair(p, kind, b.completion, b.verdict, e.completion, e.verdict)
        for (p, kind), b, e in zip(prompts, answers["base"], answers["edited"], strict=True)
    ]
    write_file(cfg.report, markdown(pairs, cfg))
    return pairs


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in (text or "(empty)").splitlines())


def markdown(pairs: list[Pair], cfg: CompareConfig) -> str:
    lines = [
        "# Base vs edited",
        "",
        f"- base: `{cfg.base}`",
        f"- edited: `{cfg.edited}`",
        f"- greedy answers of at most {cfg.max_new_tokens} tokens, chat template applied",
        "",
    ]
    for i, pair in enumerate(pairs, 1):
        kind = f" ({pair.kind})" if pair.kind else ""
        lines += [
            f"## {i}. {pair.prompt}{kind}",
            "",
            f"**base** ({pair.base_verdict}):",
            "",
            _quote(pair.base),
            "",
            f"**edited** ({pair.edited_verdict}):",
            "",
            _quote(pair.edited),
            "",
        ]
    return "\n".join(lines)
