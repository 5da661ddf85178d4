"""Judging one edit: greedy answers to the harmful prompts and the first-token KL on the
harmless ones, through the plan's run-time hooks (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import SearchConfig
from .inputs import Ready
from .space import (
    EditParams,
    blend,
)


@dataclass
class Outcome:
    """What one edit does: greedy answers to the harmful prompts, judged, and the first-token
    KL on the harmless ones. With a safety judge, ``unsafe`` counts the complied answers it
    calls unsafe (the rest of the complied ones, judge errors included, are not compliance;
    ``judge_errors`` counts those it gave no verdict on)."""

    refused: int
    complied: int
    broken: int
    kl: float
    seconds: float
    unsafe: int | None = None
    judge_errors: int = 0  # of the complied: answers the judge gave no verdict on
    implausible: int = 0  # of the broken: text-like answers the unedited model finds implausible
    score: float | None = None  # with an eval task: its metric (higher is better)
    drop: float | None = None  # the unedited model's score minus this one

    @property
    def values(self) -> list[float]:
        """The objectives, all minimized: failure, KL and (with an eval task) the drop."""
        return [self.failure, self.kl] + ([] if self.drop is None else [self.drop])

    @property
    def n(self) -> int:
        return self.refused + self.complied + self.broken

    @property
    def failure(self) -> float:
        """The objective: every answer that is not a compliance (a refusal, a degenerate
        answer, or with a judge an answer it does not call unsafe)."""
        complied = self.complied if self.unsafe is None else self.unsafe
        return (self.n - complied) / self.n

    def to_dict(self) -> dict:
        return {**asdict(self), "failure": self.failure}


class Judge:
    """Runs edits through the loaded model: greedy answers to the harmful rows and the first
    token of the harmless rows, compared with the unedited model's (computed once). With
    ``guard`` (a judge opened by ``safety.JudgeSpec``) and the harmful prompts' texts, the
    complied answers are also judged by it.

    Word salad reads as text to ``refusal.judge``, so a complied answer is also scored by the
    *unedited* model (hooks off): with a mean surprisal above ``max_surprisal`` nats per token
    (default half of ln(vocabulary), i.e. nearer to random tokens than to anything the model
    would write) it is broken, not compliance."""

    def __init__(
        self,
        model,
        tok,
        harmful_rows,
        harmless_rows,
        batch_size: int,
        budget: int,
        guard=None,
        prompts: list[str] | None = None,
        max_surprisal: float | None = None,
        scorer: Callable[[], float] | None = None,
    ):
        from ..measure.select import first_token_logprobs
        from ..runtime.refusal import default_max_surprisal
        from ..runtime.session import pad_id, stop_ids, vocab_size

        self.model, self.tok = model, tok
        self.harmful_rows, self.harmless_rows = harmful_rows, harmless_rows
        self.batch_size, self.budget = batch_size, budget
        self.guard, self.prompts = guard, prompts
        self.pad = pad_id(tok)
        self.stop = stop_ids(model, tok)
        self.base = first_token_logprobs(model, harmless_rows, batch_size, self.pad)
        self.max_surprisal = max_surprisal or default_max_surprisal(vocab_size(model))
        self.scorer = scorer
        self.base_score = None if scorer is None else scorer()

    def generate(self) -> list[list[int]]:
        """Greedy answers to the harmful rows, as token ids cut after the first stop token."""
        from ..runtime.refusal import until_stop
        from ..runtime.session import greedy_completions

        made = greedy_completions(
            self.model, self.harmful_rows, self.batch_size, self.pad, self.budget
        )
        return [until_stop(ids, self.stop) for ids in made]

    def answers(self) -> list[str]:
        return [self.decode(ids) for ids in self.generate()]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()

    def implausible(self, made: list[list[int]], verdicts: list[str]) -> list[int]:
        """Indices of complied answers the unedited model finds implausible (call it with no
        edit in place)."""
        from ..runtime.session import surprisal

        which = [i for i, v in enumerate(verdicts) if v == "complied"]
        scores = surprisal(
            self.model,
            [self.harmful_rows[i] for i in which],
            [made[i] for i in which],
            self.batch_size,
            self.pad,
        )
        return [i for i, s in zip(which, scores, strict=True) if s > self.max_surprisal]

    def unsafe(self, texts: list[str], verdicts: list[str]) -> tuple[int | None, int]:
        """How many complied answers the judge calls unsafe (None without a judge), and how
        many it gave no verdict on."""
        from ..evaluate.safety import parse_guard

        if self.guard is None:
            return None, 0
        pairs = [
            (p, t) for p, t, v in zip(self.prompts, texts, verdicts, strict=True) if v == "complied"
        ]
        said = [parse_guard(raw)[0] for raw in self.guard(pairs)] if pairs else []
        return said.count("unsafe"), said.count("error")

    def __call__(self, hooks: Callable[[], contextlib.AbstractContextManager]) -> Outcome:
        from ..measure.select import first_token_logprobs, mean_kl
        from ..runtime.refusal import judge

        clock = time.perf_counter()
        with hooks():
            made = self.generate()
            logprobs = first_token_logprobs(
                self.model, self.harmless_rows, self.batch_size, self.pad
            )
            score = None if self.scorer is None else self.scorer()
        texts = [self.decode(ids) for ids in made]
        verdicts = [judge(t) for t in texts]
        salad = self.implausible(made, verdicts)
        for i in salad:
            verdicts[i] = "broken"
        unsafe, judge_errors = self.unsafe(texts, verdicts)
        return Outcome(
            refused=verdicts.count("refused"),
            complied=verdicts.count("complied"),
            broken=verdicts.count("broken"),
            kl=mean_kl(self.base, logprobs),
            seconds=time.perf_counter() - clock,
            unsafe=unsafe,
            judge_errors=judge_errors,
            implausible=len(salad),
            score=score,
            drop=None if score is None else self.base_score - score,
        )


def ready_hooks(model, ready: Ready, direction, **plan_options):
    """Run-time hooks for an edit of ``ready``'s model along ``direction`` (a
    ``direction.Direction``), planned as ``apply`` would plan it (``plan.build_plan``; its
    ``sites`` and ``scales`` in ``plan_options``, default every writer)."""
    from ..edit.plan import build_plan
    from ..runtime.hooks import plan_hooks

    plan = build_plan(
        table=ready.table,
        checkpoint=ready.checkpoint,
        config=ready.config,
        direction=direction,
        source=str(ready.folder),
        **plan_options,
    )
    return lambda: plan_hooks(model, plan, ready.checkpoint)


def edit_hooks(model, ready: Ready, params: EditParams):
    """The trial's edit as ``apply`` would plan it, at run time (a no-op when nothing is
    edited), and the direction it uses."""
    from ..model.direction import Direction

    vector, source = blend(ready.candidates, params.layer, params.position)
    sites, scales = params.plan_scales(ready.n_layers)
    if not sites:
        return contextlib.nullcontext, vector, source
    direction = Direction(vector, Path("<search trial>"), "", "single")
    return ready_hooks(model, ready, direction, sites=sites, scales=scales), vector, source


def measure_hooks(model, ready: Ready):
    """The plain ``measure`` selection as ``apply`` edits it by default: every writer."""
    return ready_hooks(model, ready, ready.baseline_direction)


def describe(o: dict) -> str:
    """``failure 12.5% (3 refused, 1 broken of 32)`` from an outcome's dict."""
    from ..report import failure_text

    drop = "" if o.get("drop") is None else f", task drop {o['drop']:.3g}"
    return f"failure {failure_text(o)}{drop}"


def make_judge(cfg: SearchConfig, ready: Ready, model) -> Judge:
    guard = None if ready.safety_judge is None else ready.safety_judge.open(cfg)
    scorer = None
    if ready.eval_task is not None:
        from ..evaluate.bench import TaskScorer

        scorer = TaskScorer(
            model, ready.tok, ready.eval_task, cfg.eval_limit, cfg.batch_size, cfg.seed
        )
    return Judge(
        model,
        ready.tok,
        ready.harmful_rows,
        ready.harmless_rows,
        cfg.batch_size,
        cfg.max_new_tokens,
        guard,
        ready.harmful_prompts,
        cfg.max_surprisal,
        scorer,
    )
