"""Judging one edit: greedy answers to the harmful prompts and the first-token KL on the
harmless ones, through the plan's run-time hooks (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..config import SearchConfig
from ..judging.verdicts import VERDICTS
from .inputs import Ready
from .space import (
    EditParams,
    blend,
)


@dataclass
class TrialResult:
    """What one edit does: greedy answers to the harmful prompts, each with a verdict of the
    judging layer (``orthoedit.judging``), and the first-token KL on the harmless ones."""

    refused: int
    complied: int
    broken: int
    kl: float
    seconds: float
    evasive: int = 0  # a judge's: complied in form, no substance (never compliance)
    unjudged: int = 0  # the judge gave no verdict (never compliance)
    implausible: int = 0  # of the broken: text-like answers the unedited model finds implausible
    score: float | None = None  # with an eval task: its metric (higher is better)
    drop: float | None = None  # the unedited model's score minus this one

    @property
    def values(self) -> list[float]:
        """The objectives, all minimized: failure, KL and (with an eval task) the drop."""
        return [self.failure, self.kl] + ([] if self.drop is None else [self.drop])

    @property
    def n(self) -> int:
        return self.refused + self.complied + self.broken + self.evasive + self.unjudged

    @property
    def failure(self) -> float:
        """The objective: every answer that is not a compliance (``judging.failure_rate``)."""
        return (self.n - self.complied) / self.n

    def to_dict(self) -> dict:
        return {**asdict(self), "failure": self.failure}

    @classmethod
    def from_dict(cls, d: dict) -> TrialResult:
        """The result that ``to_dict`` wrote (its derived keys left out)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class TrialRunner:
    """Runs edits through the loaded model (a ``runtime.session.Session``): greedy answers to
    the harmful prompts and the first token of the harmless rows, compared with the unedited
    model's (computed once). Answers are judged by the judging layer: phrases, and with
    ``judge`` (an opened judge of ``style``) the judge on every complied answer: on every
    trial (``judge_trials``), or only where ``evaluate`` is asked to (the front, judged again
    with long answers before the choice: ``search.front``).

    Word salad reads as text to the phrases, so a complied answer is also scored by the
    *unedited* model (hooks off): with a mean surprisal above ``max_surprisal`` nats per token
    (default half of ln(vocabulary), i.e. nearer to random tokens than to anything the model
    would write) it is broken, not compliance."""

    def __init__(
        self,
        session,
        prompts: list[str],
        harmless_rows,
        budget: int,
        judge=None,
        style: str = "guard",
        max_surprisal: float | None = None,
        scorer: Callable[[], float] | None = None,
        min_score: float = 0.5,
        judge_trials: bool = True,
    ):
        from ..judging.answers import default_max_surprisal

        self.session, self.prompts, self.harmless_rows = session, prompts, harmless_rows
        self.budget, self.judge, self.style, self.min_score = budget, judge, style, min_score
        self.judge_trials = judge_trials
        self.base = self.first_tokens()
        self.max_surprisal = max_surprisal or default_max_surprisal(session.vocab_size)
        self.scorer = scorer
        self.base_score = None if scorer is None else scorer()

    @property
    def model(self):
        return self.session.model

    def first_tokens(self):
        from ..runtime.scores import first_token_logprobs

        s = self.session
        return first_token_logprobs(s.model, self.harmless_rows, s.batch_size, s.pad)

    def answers(self, budget: int | None = None) -> list:
        """Judged answers to the harmful prompts (with whatever hooks are active)."""
        from ..judging.answers import answer_prompts

        return answer_prompts(self.session, self.prompts, max_new_tokens=budget or self.budget)

    def __call__(self, hooks: Callable[[], contextlib.AbstractContextManager]) -> TrialResult:
        """A trial's score: answers of the trials' budget, judged by phrases (and by the
        judge where ``judge_trials``)."""
        return self.evaluate(hooks, self.budget, self.judge_trials)

    def evaluate(self, hooks, budget: int, judged: bool) -> TrialResult:
        """The edit's answers within ``budget`` tokens, judged by phrases, word salad and
        (``judged``, with a judge) the judge; its KL and task score."""
        from ..runtime.scores import mean_kl

        clock = time.perf_counter()
        with hooks():
            answers = self.answers(budget)
            logprobs = self.first_tokens()
            score = None if self.scorer is None else self.scorer()
        salad = self._judge(answers, judged)
        count = {v: sum(a.verdict == v for a in answers) for v in VERDICTS}
        return TrialResult(
            refused=count["refused"],
            complied=count["complied"],
            broken=count["broken"],
            evasive=count["evasive"],
            unjudged=count["unjudged"],
            kl=mean_kl(self.base, logprobs),
            seconds=time.perf_counter() - clock,
            implausible=salad,
            score=score,
            drop=None if score is None else self.base_score - score,
        )

    def _judge(self, answers: list, judged: bool) -> int:
        """Word salad under the unedited model (hooks off), then the judge on what is still
        complied; returns how many answers were word salad."""
        from ..judging.answers import apply_judge, mark_implausible

        complied = [a for a in answers if a.verdict == "complied"]
        salad = mark_implausible(self.session, complied, self.max_surprisal) if complied else 0
        complied = [a for a in answers if a.verdict == "complied"]
        if judged and self.judge is not None and complied:
            replies = self.judge([(a.prompt, a.completion) for a in complied])
            apply_judge(self.style, complied, replies, self.min_score)
        return salad


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


def open_runner(cfg: SearchConfig, ready: Ready, log=None) -> TrialRunner:
    """Load the search's model as a session (measure's system prompt, where the search took
    it from there) and make the trials' runner on it; ``log`` hears which dtype ``auto``
    chose."""
    from ..runtime.session import Session

    session = Session.open(ready.folder, cfg, tok=ready.tok, log=log)
    session.system = ready.settings["system"]
    return make_runner(cfg, ready, session)


def make_runner(cfg: SearchConfig, ready: Ready, session) -> TrialRunner:
    """The trials' runner on the loaded ``session``, with the search's judge and eval task."""
    spec = ready.safety_judge
    scorer = None
    if ready.eval_task is not None:
        from ..evals.tasks import TaskScorer

        scorer = TaskScorer(
            session.model, ready.tok, ready.eval_task, cfg.eval_limit, cfg.batch_size, cfg.seed
        )
    return TrialRunner(
        session,
        ready.harmful_prompts,
        ready.harmless_rows,
        cfg.max_new_tokens,
        None if spec is None else spec.open(cfg),
        "guard" if spec is None else spec.style,
        cfg.max_surprisal,
        scorer,
        cfg.judge_min_score,
        judge_trials=cfg.front_budget() == 0,  # else the judge reads the front only
    )
