"""The choice among trials, the Pareto front and the budget in words: pure functions of
the stored trials."""

from __future__ import annotations

from ..config import SearchConfig
from .trial import TrialResult


def choose(
    trials: list,
    max_kl: float,
    max_drop: float | None = None,
    max_failure: float | None = None,
    unedited: float | None = None,
    strong: dict | None = None,
):
    """The lowest failure rate with KL within the budget; ties: lower KL, then the earlier
    trial. With ``max_failure`` instead: the lowest KL with a failure rate at most that; ties:
    lower failure, then the earlier trial. With an eval task and ``max_drop``, only trials
    whose drop is within it; with ``unedited`` (the unedited model's failure rate), only
    trials that fail less often, so that a no-op is never the choice. With ``strong`` (the
    front judged again: ``search.front``), only its trials, by their strong scores. None when
    no trial qualifies. A pure function of the stored trials."""
    if strong is not None:
        trials = [t for t in trials if str(t.number) in strong["trials"]]
    v = {t.number: objectives(t, strong) for t in trials}
    ok = [t for t in trials if max_drop is None or v[t.number][2] <= max_drop]
    ok = [t for t in ok if unedited is None or v[t.number][0] < unedited]
    if max_failure is not None:
        ok = [t for t in ok if v[t.number][0] <= max_failure]
        return min(ok, key=lambda t: (v[t.number][1], v[t.number][0], t.number), default=None)
    ok = [t for t in ok if v[t.number][1] <= max_kl]
    return min(ok, key=lambda t: (v[t.number][0], v[t.number][1], t.number), default=None)


def objectives(t, strong: dict | None = None) -> list[float]:
    """A trial's failure rate, KL and (with an eval task) drop, whatever its sampler
    minimized (``--objective budget`` stores one value); its strong scores where ``strong``
    has them."""
    a = t.user_attrs
    if strong is not None and str(t.number) in strong["trials"]:
        a = strong["trials"][str(t.number)]
    return [a["failure"], a["kl"]] + ([] if a.get("drop") is None else [a["drop"]])


def target_failure(max_failure, baselines: dict | None) -> float | None:
    """``--max-failure`` as a rate: 'measure' is measure's own selection's failure rate on
    the search's prompts (judged before the first trial)."""
    if max_failure == "measure":
        return None if baselines is None else baselines["measure"]["failure"]
    return max_failure


def choose_for(trials: list, cfg: SearchConfig, baselines: dict | None, strong=None):
    """The choice under ``cfg``'s rule, never a trial that fails as often as the unedited
    model (a no-op is not an edit). With ``strong`` (``search.front``), by the front's strong
    scores, against the baselines' strong scores."""
    if strong is not None:
        baselines = strong["baselines"]
    failure = target_failure(cfg.max_failure, baselines)
    unedited = None if baselines is None else baselines["no edit"]["failure"]
    return choose(trials, cfg.max_kl, cfg.max_drop, failure, unedited, strong)


def budget(cfg: SearchConfig, baselines: dict | None = None) -> str:
    """The choice rule's limits in words: ``KL ≤ 0.1`` or ``failure ≤ 0%``, and the drop."""
    failure = target_failure(cfg.max_failure, baselines)
    if cfg.max_failure == "measure":
        text = "failure ≤ measure's" + ("" if failure is None else f" ({failure:.1%})")
    else:
        text = f"KL ≤ {cfg.max_kl:g}" if failure is None else f"failure ≤ {failure:.1%}"
    return text + ("" if cfg.max_drop is None else f", task drop ≤ {cfg.max_drop:g}")


def none_chosen(trials: list, cfg: SearchConfig, baselines: dict, strong=None) -> str:
    """Why no trial was chosen, in one line: the rule, the no-op rule, the nearest trials that
    edit (by the rule's own order) and measure's selection (by the strong scores where the
    front was judged again)."""
    if strong is not None:
        baselines = strong["baselines"]
        trials = [t for t in trials if str(t.number) in strong["trials"]]
    unedited = baselines["no edit"]["failure"]

    def values(t):
        return objectives(t, strong)

    edits = [t for t in trials if values(t)[0] < unedited]
    by_failure = target_failure(cfg.max_failure, baselines) is not None

    def order(t):
        failure, kl = values(t)[:2]
        return (failure, kl, t.number) if by_failure else (kl, failure, t.number)

    near = sorted(edits, key=order)
    shown = "; ".join(
        f"#{t.number} failure {values(t)[0]:.1%}, KL {values(t)[1]:.3g}" for t in near[:3]
    )
    m = baselines["measure"]
    return (
        f"no trial has {budget(cfg, baselines)} and fails less often than the unedited model "
        f"({unedited:.1%}; a no-op is never the choice). "
        + (f"Nearest: {shown}. " if shown else "No trial edits at all. ")
        + f"Measure's selection: failure {m['failure']:.1%}, KL {m['kl']:.3g}"
    )


def budget_value(outcome: TrialResult, target: float, cost: float) -> float:
    """``--objective budget``: KL plus ``cost`` per prompt failed beyond the target rate."""
    return outcome.kl + cost * max(0.0, (outcome.failure - target) * outcome.n)


def pareto(trials: list) -> list:
    """Trials no other trial dominates (at least as good on every objective, better on one;
    of trials at the very same point only the earliest is kept), ordered by KL."""
    front = []
    values = {t.number: objectives(t) for t in trials}
    for t in trials:
        mine = values[t.number]
        dominated = any(
            all(a <= b for a, b in zip(values[o.number], mine, strict=True))
            and (values[o.number] != mine or o.number < t.number)
            for o in trials
            if o is not t
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (values[t.number][1], values[t.number][0], t.number))
