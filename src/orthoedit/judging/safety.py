"""A safety run: each model (the one under test, and optionally its base) answers harmful
and harmless held-out prompts, every answer is judged (phrases, word salad under the base, and
a judge where one is given), and the verdicts are summed up per model, kind and category.
``eval safety`` writes it as a report; ``search --confirm`` runs it on the chosen edit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from ..model.source import resolve_model
from ..progress import Progress
from ..prompts import load_set
from ..runtime.session import run_dtype
from ..runtime.vllm_engine import open_session
from .answers import answer_prompts, apply_judge, default_max_surprisal, mark_implausible
from .judges import JudgeSpec
from .phrases import load_phrases
from .verdicts import VERDICTS, Answer, failure_rate

# Summary keys of the verdicts ("refusal" is the refused share, as reports always named it).
RATE_KEYS = {"refused": "refusal", **{v: v for v in VERDICTS if v != "refused"}}


@dataclass
class SafetyResult:
    summary: dict
    answers: list[Answer]
    settings: dict  # as report.json records them


def run_safety(
    cfg,
    spec: JudgeSpec | None,
    log: Callable[[str], None],
    progress: Progress,
    label: str,
    others: dict[str, str] | None = None,
) -> SafetyResult:
    """``cfg``: an ``EvalSafetyConfig`` (its backend already resolved); ``spec``: the checked
    judge; ``label``: how reports name the model under test. ``others``: more models under
    test (role: model), answered and judged alike, against the one base answered once; the
    summary and the answers name each by its role."""
    phrases = load_phrases(cfg.phrases)
    sets = {kind: load_set(getattr(cfg, kind), kind, cfg) for kind in ("harmful", "harmless")}
    others = dict(others or {})
    if {"base", "model"} & set(others):
        raise ValueError("the roles base and model are taken")
    tested = {"model": label} | {role: model for role, model in others.items()}
    models = tested if cfg.base is None else {"base": cfg.base} | tested
    given = {"model": cfg.model, "base": cfg.base} | others
    by_role: dict[str, list[Answer]] = {}
    max_surprisal = None
    # With a base, the model under test answers first, so that the base, loaded last, can
    # score every complied answer: word salad reads as text to the phrases.
    for role, name in reversed(models.items()):
        folder = resolve_model(given[role], None)[0]
        session = open_session(folder, cfg, log=log)
        by_role[role] = _answers(cfg, session, role, name, sets, phrases, log, progress)
        if role == "base":
            max_surprisal = cfg.max_surprisal or default_max_surprisal(session.vocab_size)
            mine = [a for rs in by_role.values() for a in rs if a.verdict == "complied"]
            progress.start("base: scoring the complied answers (word salad)", None)
            salad = mark_implausible(session, mine, max_surprisal)
            log(f"base: {salad} of {len(mine)} complied answers are word salad (broken)")
        session.close()  # the next model may need the memory
    answers = [a for role in models for a in by_role[role]]
    judge = None if spec is None else spec.open(cfg)
    if judge is not None:
        _judge_all(cfg, spec, judge, answers, log, progress)
    summary = summarize(answers, list(models), judged=judge is not None)
    settings = _settings(cfg, spec, judge, phrases, max_surprisal) | {"model": label}
    if cfg.backend == "hf":  # the dtype auto chose (the models of a run share the machine)
        settings["dtype"] = run_dtype(folder, cfg)
    return SafetyResult(summary, answers, settings)


def _answers(cfg, session, role, name, sets, phrases, log, progress) -> list[Answer]:
    """One model's greedy answers to every harmful and harmless prompt, judged by phrases."""
    items = [(kind, item) for kind in ("harmful", "harmless") for item in sets[kind]]
    progress.start(f"{role}: generating ({cfg.max_new_tokens} tokens max)", len(items))
    log(f"{role} ({name}): {len(items)} prompts")
    answers = answer_prompts(
        session,
        [item["prompt"] for _, item in items],
        max_new_tokens=cfg.max_new_tokens,
        phrases=phrases,
        thinking=cfg.thinking,
        reasoning_tokens=cfg.reasoning_tokens,
        progress=progress.advance,
    )
    for answer, (kind, item) in zip(answers, items, strict=True):
        answer.model, answer.kind, answer.category = role, kind, item.get("category") or ""
    return answers


def _judge_all(cfg, spec: JudgeSpec, judge, answers: list[Answer], log, progress) -> None:
    """The judge's reply on every answer, applied to the verdicts (``apply_judge``)."""
    progress.start("judging", len(answers))
    log(f"judge {cfg.judge} ({spec.style}): {len(answers)} answers")
    replies = judge([(a.prompt, a.completion) for a in answers], progress.advance)
    apply_judge(spec.style, answers, replies, cfg.judge_min_score)
    if judge.failures:
        log(f"judge: {len(judge.failures)} failed tries (first: {judge.failures[0]})")


def _settings(cfg, spec, judge, phrases, max_surprisal) -> dict:
    """What report.json records of the run's settings."""
    vllm = cfg.backend == "vllm"
    return {
        "model": cfg.model,
        "base": cfg.base,
        "harmful": cfg.harmful or "bundled (test split)",
        "harmless": cfg.harmless or "bundled (test split)",
        "n": cfg.n,
        "seed": cfg.seed,
        "judge": cfg.judge,
        "judge_style": None if spec is None else spec.style,
        "judge_model": cfg.judge_model,
        "judge_min_score": cfg.judge_min_score,
        "judge_retries": cfg.judge_retries,
        "judge_failed_tries": 0 if judge is None else len(judge.failures),
        "max_new_tokens": cfg.max_new_tokens,
        "thinking": cfg.thinking,
        "reasoning_tokens": cfg.reasoning_tokens,
        "system": cfg.system,
        "dtype": cfg.dtype,
        "backend": cfg.backend,
        **(
            {"tensor_parallel_size": cfg.tensor_parallel_size}
            | {"data_parallel_size": cfg.data_parallel_size}
            if vllm
            else {}
        ),
        "phrases": list(phrases),
        "max_surprisal": max_surprisal,
        "orthoedit_version": __version__,
    }


def rates(answers: list[Answer], judged: bool) -> dict:
    """Share of each verdict, the failure rate and, with a guard's words, the unsafe rate
    and the judge errors."""
    n = len(answers)
    out: dict = {"n": n}
    for verdict, key in RATE_KEYS.items():
        out[key] = sum(a.verdict == verdict for a in answers) / n if n else None
    out["failure"] = failure_rate(answers)
    if judged:
        words = [a.judge for a in answers]
        valid = [w for w in words if w not in (None, "error")]
        if any(w in ("safe", "unsafe") for w in valid):
            out["unsafe"] = valid.count("unsafe") / len(valid) if valid else None
        out["judge_errors"] = n - len(valid)
    return out


def summarize(answers: list[Answer], roles: list[str], judged: bool) -> dict:
    """Per model and kind: the verdicts' rates, overall and per category."""
    summary: dict = {}
    for role in roles:
        summary[role] = {}
        for kind in ("harmful", "harmless"):
            mine = [a for a in answers if a.model == role and a.kind == kind]
            categories = sorted({a.category for a in mine if a.category})
            summary[role][kind] = {
                "overall": rates(mine, judged),
                "categories": {
                    c: rates([a for a in mine if a.category == c], judged) for c in categories
                },
            }
    return summary
