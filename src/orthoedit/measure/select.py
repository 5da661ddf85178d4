"""Choosing among candidate directions (docs/design.md §7: everything in log-odds).

Refusal is scored as the log-odds that an answer opens with one of the model's own refusal
openings (``refusal_openings``: the shortest prefixes of its greedy refusals that read as
refusals, e.g. "I'm sorry" or "As an AI"), teacher-forced (``refusal_score``). Each candidate is
scored on validation prompts: **bypass** (harmful prompts, candidate ablated exactly as
``apply`` would edit it), **induce** (harmless prompts, candidate added at its layer) and **KL**
(first-token KL on harmless prompts under the ablation). Candidates are filtered (KL budget,
induce, depth) and the lowest bypass wins.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..edit.plan import build_plan
from ..errors import CheckFailedError
from ..model.direction import Direction
from ..progress import Progress
from ..runtime.hooks import addition_hooks, plan_hooks
from ..runtime.scores import mean_kl, refusal_score


@dataclass
class Score:
    layer: int
    position: int
    bypass: float
    induce: float
    kl: float
    kept: bool = True
    why: list[str] = field(default_factory=list)


@dataclass
class Selection:
    chosen: Score | None  # None only in NoCandidateError.selection
    scores: list[Score]
    baseline: dict[str, float]
    openings: list[tuple[int, ...]]  # token ids of the refusal openings scored
    thresholds: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    nearest: Score | None = None  # when none passed: the lowest bypass, as a starting point

    def to_dict(self) -> dict:
        return {
            "chosen": asdict(self.chosen) if self.chosen else None,
            "nearest": asdict(self.nearest) if self.nearest else None,
            "baseline": self.baseline,
            "refusal_openings_ids": [list(o) for o in self.openings],
            "thresholds": self.thresholds,
            "timings": self.timings,
            "scores": [asdict(s) for s in self.scores],
        }


class NoCandidateError(CheckFailedError):
    """Every candidate failed a filter; ``selection`` holds the scores (``chosen`` is None,
    ``nearest`` the lowest bypass)."""

    def __init__(self, message: str, selection: Selection):
        super().__init__(message)
        self.selection = selection


def _unscored(layer: int, position: int, why: str) -> Score:
    nan = float("nan")
    return Score(layer, position, nan, nan, nan, kept=False, why=[why])


def _eligible(candidates: torch.Tensor, max_layer_frac: float) -> tuple[dict, list]:
    """The candidates that are scored, and the others as unscored scores with the reason:
    no difference between the means, or too deep a layer."""
    n_layers, n_pos, _ = candidates.shape
    scores: dict[tuple[int, int], Score] = {}
    eligible: list[tuple[int, int]] = []
    largest = float(candidates.double().norm(dim=-1).max())
    for layer in range(n_layers):
        for p in range(n_pos):
            if float(candidates[layer, p].double().norm()) <= 1e-6 * largest:
                # e.g. the embedding of a template token that every prompt shares
                scores[layer, p] = _unscored(layer, p - n_pos, "no difference between the means")
            elif layer >= max_layer_frac * n_layers:
                why = f"layer {layer} >= {max_layer_frac:.0%} of depth (not scored)"
                scores[layer, p] = _unscored(layer, p - n_pos, why)
            else:
                eligible.append((layer, p))
    return scores, eligible


def _prune(eligible: list, quick, top_k: int, n_pos: int, scores: dict, progress) -> list:
    """The ``top_k`` eligible candidates of lowest quick bypass (``quick(layer, p)``); the
    others go into ``scores`` as pruned."""
    if progress:
        progress.start("quick bypass (pruning)", len(eligible))
    bypass = {}
    for c in eligible:
        bypass[c] = quick(*c)
        if progress:
            progress.advance()
    full = sorted(eligible, key=lambda c: bypass[c])[:top_k]
    for c in eligible:
        if c not in full:
            why = f"pruned: quick bypass {bypass[c]:.2f} not among the best {top_k}"
            scores[c] = _unscored(c[0], c[1] - n_pos, why)
    return full


@dataclass
class Scorer:
    """A loaded model and what scoring a candidate on it needs: the refusal openings, and what
    ``build_plan`` needs to make the edit ``apply`` would make of a candidate."""

    model: object
    table: object
    checkpoint: object
    config: dict
    folder: Path
    openings: list[tuple[int, ...]]
    batch_size: int
    pad: int

    def score(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``refusal_score`` of ``rows`` on the model as it is (hooks included)."""
        return refusal_score(self.model, rows, self.openings, self.batch_size, self.pad)

    def ablated(self, r: torch.Tensor):
        """Hooks that ablate ``r`` exactly as apply's edit would (the plan, at run time)."""
        direction = Direction(r.numpy(), Path("<candidate>"), "", "single")
        plan = build_plan(
            table=self.table,
            checkpoint=self.checkpoint,
            config=self.config,
            direction=direction,
            source=str(self.folder),
        )
        return plan_hooks(self.model, plan, self.checkpoint)


def select(
    scorer: Scorer,
    candidates: torch.Tensor,
    harmful_rows: list[list[int]],
    harmless_rows: list[list[int]],
    *,
    max_kl: float,
    max_layer_frac: float,
    top_k: int = 0,
    prune_prompts: int = 8,
    progress: Progress | None = None,
) -> Selection:
    """Score the candidates ``candidates[layer, position index]`` and choose one.

    Candidates from too deep a layer, or with no difference between the means, are not
    scored. With ``top_k`` > 0 and more eligible candidates than that, a quick bypass on the
    first ``prune_prompts`` harmful prompts ranks them first, and only the best ``top_k`` get
    the full scores (``top_k=0``: all of them, the paper's protocol).
    """
    n_pos = candidates.shape[1]
    both = harmful_rows + harmless_rows  # one batched pass scores bypass and KL together
    clock = time.perf_counter()
    base, base_odds = scorer.score(both)
    timings = {"validation_pass_s": time.perf_counter() - clock, "quick_s": 0.0, "n_quick": 0}
    baseline = {
        "harmful_log_odds": float(base_odds[: len(harmful_rows)].mean()),
        "harmless_log_odds": float(base_odds[len(harmful_rows) :].mean()),
    }
    # The paper keeps candidates whose addition makes harmless prompts refuse (log-odds > 0),
    # which presumes a model that refuses harmful prompts with odds above even; a model that
    # refuses some of them never gets there. Relative to this model's own baselines instead:
    # the addition must move harmless prompts at least halfway to the harmful ones.
    min_induce = (baseline["harmful_log_odds"] + baseline["harmless_log_odds"]) / 2
    scores, full = _eligible(candidates, max_layer_frac)
    if top_k and len(full) > top_k:

        def quick(layer: int, p: int) -> float:
            with scorer.ablated(candidates[layer, p].double()):
                return float(scorer.score(harmful_rows[:prune_prompts])[1].mean())

        clock = time.perf_counter()
        timings["n_quick"] = len(full)
        full = _prune(full, quick, top_k, n_pos, scores, progress)
        timings["quick_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    if progress:
        progress.start("scoring candidates", len(full))
    for layer, p in full:
        score = _full_score(scorer, candidates, layer, p, harmful_rows, harmless_rows, base)
        scores[layer, p] = _filtered(score, max_kl, min_induce)
        if progress:
            progress.advance()
    timings.update(full_s=time.perf_counter() - clock, n_full=len(full))
    thresholds = dict(max_kl=max_kl, max_layer_frac=max_layer_frac, min_induce=min_induce)
    thresholds.update(top_k=top_k, prune_prompts=prune_prompts)
    ordered = [scores[c] for c in sorted(scores)]
    return _chosen(ordered, baseline, scorer.openings, thresholds, timings)


def _full_score(scorer: Scorer, candidates, layer, p, harmful_rows, harmless_rows, base) -> Score:
    """Bypass and KL (the candidate ablated on harmful + harmless prompts, one pass) and induce
    (the candidate added at its layer on harmless prompts); ``base``: first-token
    log-probabilities of the unedited model on harmful + harmless."""
    r, n_harmful = candidates[layer, p].double(), len(harmful_rows)
    with scorer.ablated(r):
        ablated, ablated_odds = scorer.score(harmful_rows + harmless_rows)
    with addition_hooks(scorer.model, scorer.table, layer, r.float()):
        _, added_odds = scorer.score(harmless_rows)
    return Score(
        layer=layer,
        position=p - candidates.shape[1],
        bypass=float(ablated_odds[:n_harmful].mean()),
        induce=float(added_odds.mean()),
        kl=mean_kl(base[n_harmful:], ablated[n_harmful:]),
    )


def _filtered(score: Score, max_kl: float, min_induce: float) -> Score:
    """A fully scored candidate, kept or with the reasons it is not."""
    if score.kl > max_kl:
        score.why.append(f"KL {score.kl:.3g} > {max_kl}")
    if score.induce < min_induce:
        score.why.append(f"induce {score.induce:.3g} < {min_induce:.3g}")
    score.kept = not score.why
    return score


def _chosen(ordered: list, baseline: dict, openings, thresholds: dict, timings: dict) -> Selection:
    """The kept candidate of lowest bypass; none kept: NoCandidateError with the nearest."""
    kept = [s for s in ordered if s.kept]
    if not kept:
        scored = [s for s in ordered if s.bypass == s.bypass]  # not NaN
        if not scored:
            raise CheckFailedError("no candidate could be scored (see --max-layer-frac).")
        best = min(scored, key=lambda s: s.bypass)
        raise NoCandidateError(
            f"no candidate passes the filters (lowest bypass: layer {best.layer}, position "
            f"{best.position}: {'; '.join(best.why)})",
            Selection(None, ordered, baseline, openings, thresholds, timings, nearest=best),
        )
    chosen = min(kept, key=lambda s: s.bypass)
    return Selection(chosen, ordered, baseline, openings, thresholds, timings)
