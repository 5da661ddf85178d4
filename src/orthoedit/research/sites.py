"""Research: where refusal lives (``orthoedit study sites``).

For one direction r, the refusal effect of removing it at subsets of the places it can be
removed, in log-odds (docs/design.md §7):

* **run time** (hooks, r̂ projected out at every layer and position): the residual stream
  entering every block (``residual``), the attention outputs (``attn``), the MLP outputs
  (``mlp``), or all three (``all``: the paper's directional ablation, ``hooks.ablation_hooks``);
  and the residual stream entering one block only, the one the direction was measured at
  (``residual, one layer``);
* **weight edit**: exactly the plan ``apply --sites ...`` would execute (the architecture's
  default tied-embedding policy, as apply), evaluated through ``hooks.plan_hooks``, the verified
  run-time equivalent of the edited checkpoint, so that no checkpoint is written: embeddings
  (``embed``), attention output projections (``attn``), MLP output projections (``mlp``), or
  every writer (``all``).

Each condition is scored as ``measure`` scores a candidate: mean log-odds that an answer to a
harmful prompt opens with one of the model's refusal openings
(``runtime.scores.refusal_score``), and first-token KL of the harmless prompts against no
intervention (both from one batched pass over harmful + harmless prompts, as measure scores
candidates); plus the verdicts of greedy answers to the harmful prompts from the judging layer
(``orthoedit.judging``: refused, broken, and with ``--judge`` evasive and unjudged) and their
failure rate. Effects are the change from the baseline in log-odds (a log Bayes
factor) and its share of the full run-time ablation's change.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..config import StudySitesConfig
from ..errors import BadInputError
from ..folders import MeasureFolder
from ..model.architectures import SITES
from ..progress import Progress
from ..runtime.hooks import ABLATION_POINTS, ablation_hooks, plan_hooks
from ..runtime.session import Session, load_tokenizer, run_dtype, start_stage

#: Run-time conditions: name -> the ablation points hooked (``hooks.ABLATION_POINTS``).
RUNTIME: dict[str, tuple[str, ...]] = {
    "residual": ("residual",),
    "attn": ("attn",),
    "mlp": ("mlp",),
    "all": ABLATION_POINTS,
}
#: Weight-edit conditions: name -> ``apply --sites``.
WEIGHT: dict[str, list] = {"embed": ["embed"], "attn": ["attn"], "mlp": ["mlp"], "all": list(SITES)}
#: The run-time condition that removes the direction from one block's input only: the layer
#: the direction was measured at (the residual stream entering block L, every position).
ONE_LAYER = "residual, one layer"
KINDS = ("baseline", "run time", "weight edit")
#: The share of the full effect is undefined when the full ablation moves less than this.
MIN_FULL_EFFECT = 1e-6


@dataclass
class Intervention:
    """One condition: ``hooks()`` is the context manager that applies it (None: not
    applicable, with the reason in ``note``)."""

    kind: str  # one of KINDS
    name: str  # "none", or a key of RUNTIME / WEIGHT
    sites: str  # what is projected, e.g. "residual+attn+mlp" or "embed+attn+mlp"
    hooks: Callable[[], contextlib.AbstractContextManager] | None
    note: str | None = None
    plan: object | None = None  # the weight edit's Plan

    @property
    def label(self) -> str:
        return "baseline" if self.kind == "baseline" else f"{self.kind}: {self.name}"


def direction_layer(direction) -> int | None:
    """The layer a direction was taken at: the row of a per-layer file, or where measure took
    it (its ``layer`` metadata); None when it does not say (a blend of layers, say)."""
    if direction.row is not None:
        return int(direction.row)
    layer = str(direction.metadata.get("layer", ""))
    return int(layer) if layer.isdigit() else None


def interventions(*, model, table, checkpoint, config: dict, direction, source: str) -> list:
    """Baseline, the four run-time ablations, the residual stream at the direction's own layer
    alone, and the four weight edits, in that order."""
    from ..edit.plan import build_plan

    _, n_layers, _ = table.dims(config)
    r = direction.vector
    found = [Intervention("baseline", "none", "-", contextlib.nullcontext)]
    for name, points in RUNTIME.items():
        hooks = functools.partial(ablation_hooks, model, table, r, n_layers, points)
        found.append(Intervention("run time", name, "+".join(points), hooks))
    layer = direction_layer(direction)
    if layer is None or not 0 <= layer < n_layers:
        note = "the direction does not say which layer it was measured at"
        found.append(Intervention("run time", ONE_LAYER, "residual", None, note=note))
    else:
        one = functools.partial(
            ablation_hooks, model, table, r, n_layers, ("residual",), layers=[layer]
        )
        found.append(Intervention("run time", ONE_LAYER, f"residual, layer {layer}", one))
    for name, sites in WEIGHT.items():
        try:
            plan = build_plan(
                table=table,
                checkpoint=checkpoint,
                config=config,
                direction=direction,
                source=source,
                sites=sites,
            )
        except BadInputError as err:
            if sites != ["embed"]:
                raise
            # tied embeddings under the family's 'skip' policy: apply --sites embed edits nothing
            found.append(Intervention("weight edit", name, "embed", None, note=str(err)))
            continue
        note = "; ".join(plan.warnings) or None
        hooks = functools.partial(plan_hooks, model, plan, checkpoint)
        found.append(Intervention("weight edit", name, "+".join(plan.sites), hooks, note, plan))
    return found


@dataclass
class SiteResult:
    """One condition's numbers (None where not applicable)."""

    kind: str
    name: str
    sites: str
    log_odds: float | None = None  # mean refusal log-odds, harmful prompts
    delta: float | None = None  # log_odds - baseline (a log Bayes factor)
    share: float | None = None  # delta / delta of the full run-time ablation
    refusal: float | None = None  # refusal rate of greedy answers, harmful prompts
    broken: float | None = None  # degenerate answers, harmful prompts
    evasive: float | None = None  # a judge's: complied in form, no substance (with --judge)
    unjudged: float | None = None  # no verdict from the judge (with --judge)
    failure: float | None = None  # not complied, harmful prompts
    unsafe: float | None = None  # a guard judge's unsafe rate among its verdicts
    kl: float | None = None  # first-token KL(baseline ‖ condition), harmless prompts
    seconds: float | None = None
    note: str | None = None
    answers: list = field(default_factory=list, repr=False)  # judging.verdicts.Answer

    @property
    def applicable(self) -> bool:
        return self.log_odds is not None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("answers")
        return out


@dataclass
class SitesResult:
    out: Path
    outcomes: list[SiteResult]
    finding: str
    report: dict


@dataclass
class _Prepared:
    """Everything resolved and checked before the model runs."""

    folder: Path
    revision: str | None
    config: dict
    table: object
    direction: object
    prompts: dict[str, list[str]]
    tok: object
    rows: list[list[int]]  # harmful rows, then harmless rows
    openings: list[tuple[int, ...]] | None
    tokens_from: str | None
    safety_judge: object  # a judging.judges.JudgeSpec with --judge, else None


def prepare(cfg: StudySitesConfig) -> _Prepared:
    """Validate every input (nothing is loaded into memory but the tokenizer)."""

    from ..judging.judges import check_judge
    from ..judging.openings import measured_refusal_openings, parse_refusal_tokens
    from ..model.derive import table_or_derived
    from ..model.direction import load_direction
    from ..model.source import read_config, resolve_model
    from ..prompts import load_sets
    from ..runtime.session import chat_ids, post_instruction_ids

    safety_judge = check_judge(cfg)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table_or_derived(config)
    d_model, n_layers, _ = table.dims(config)
    direction = load_direction(cfg.direction, d_model, n_layers, cfg.direction_layer)
    prompts = load_sets(cfg)
    tok = load_tokenizer(folder, cfg.template)
    post = post_instruction_ids(tok, cfg.system)
    rows = [
        row
        for kind in ("harmful", "harmless")
        for row in chat_ids(tok, prompts[kind], post, cfg.system)
    ]
    if cfg.refusal_tokens:
        openings = [(t,) for t in parse_refusal_tokens(tok, cfg.refusal_tokens)]
        tokens_from = "--refusal-tokens"
    else:
        openings = measured_refusal_openings(tok, direction.path)
        tokens_from = None if openings is None else str(MeasureFolder.of(direction.path).scores)
    return _Prepared(
        folder,
        revision,
        config,
        table,
        direction,
        prompts,
        tok,
        rows,
        openings,
        tokens_from,
        safety_judge,
    )


def _derive_openings(session, ready: _Prepared, harmful_ids, log, progress) -> list:
    """Refusal openings as ``measure`` derives them: from the first ``FILTER_TOKENS`` tokens of
    the model's own greedy answers to the harmful and harmless prompts."""
    from ..judging.openings import FILTER_TOKENS, refusal_openings
    from ..runtime.session import generate

    n_harmful = len(ready.prompts["harmful"])
    progress.start(
        "refusal tokens: greedy answers to harmless prompts", len(ready.rows) - n_harmful
    )
    made = generate(session, ready.rows[n_harmful:], FILTER_TOKENS, progress.advance)
    harmless_ids = [g.ids for g in made]
    return refusal_openings(
        session.tok, [ids[:FILTER_TOKENS] for ids in harmful_ids], harmless_ids, log
    )


def _run_conditions(cfg: StudySitesConfig, ready: _Prepared, log, progress) -> list[SiteResult]:
    """Every condition through the model, loaded once; the model is released on return."""
    from ..model.source import open_checkpoint

    progress.start("loading the model", None)
    session = Session.open(ready.folder, cfg, tok=ready.tok)
    found = interventions(
        model=session.model,
        table=ready.table,
        checkpoint=open_checkpoint(ready.folder),
        config=ready.config,
        direction=ready.direction,
        source=str(ready.folder),
    )
    outcomes: list[SiteResult] = []
    base = None
    for iv in found:
        outcome = SiteResult(iv.kind, iv.name, iv.sites, note=iv.note)
        outcomes.append(outcome)
        if iv.hooks is not None:
            base = _run_one(cfg, ready, session, iv, outcome, base, log, progress)
    return outcomes


def _run_one(cfg, ready: _Prepared, session, iv, outcome: SiteResult, base, log, progress):
    """One condition's answers (judged) and scores; returns the baseline's first-token
    log-probabilities (this condition's, when it is the first)."""
    from ..judging.answers import read_answers
    from ..runtime.scores import mean_kl, refusal_score
    from ..runtime.session import generate

    harmful = ready.prompts["harmful"]
    n_harmful = len(harmful)
    clock = time.perf_counter()
    with iv.hooks():
        budget = cfg.max_new_tokens
        progress.start(f"{iv.label}: greedy answers ({budget} tokens max)", n_harmful)
        made = generate(session, ready.rows[:n_harmful], budget, progress.advance)
        if ready.openings is None:  # the baseline comes first
            ids = [g.ids for g in made]
            ready.openings = _derive_openings(session, ready, ids, log, progress)
            ready.tokens_from = "derived from the model's own answers"
        progress.start(f"{iv.label}: refusal score", None)
        # harmful + harmless in one batched pass, exactly as measure scores a candidate
        logprobs, odds = refusal_score(
            session.model, ready.rows, ready.openings, cfg.batch_size, session.pad
        )
    base = logprobs if base is None else base
    outcome.answers = read_answers(harmful, made, [None] * n_harmful)
    _rates(outcome)
    outcome.log_odds = float(odds[:n_harmful].mean())
    outcome.kl = mean_kl(base[n_harmful:], logprobs[n_harmful:])
    outcome.seconds = time.perf_counter() - clock
    log(
        f"{iv.label}: refusal log-odds {outcome.log_odds:.3f}, refusal "
        f"{100 * outcome.refusal:.1f}%, KL {outcome.kl:.4g}"
    )
    return base


def _rates(outcome: SiteResult) -> None:
    """The verdicts' shares among a condition's answers (``judging.verdicts``)."""
    from ..judging.verdicts import failure_rate, tally

    count, n = tally(outcome.answers), len(outcome.answers)
    outcome.refusal, outcome.broken = count["refused"] / n, count["broken"] / n
    outcome.evasive, outcome.unjudged = count["evasive"] / n, count["unjudged"] / n
    outcome.failure = failure_rate(outcome.answers)


def _judge_answers(cfg, ready: _Prepared, outcomes: list[SiteResult], log, progress) -> None:
    """The judge on every answer of every condition (as eval safety judges), applied to the
    verdicts (only complied ones change); a guard's unsafe rate is kept per condition."""
    from ..judging.answers import apply_judge

    judged = [o for o in outcomes if o.applicable]
    answers = [a for o in judged for a in o.answers]
    judge = ready.safety_judge.open(cfg)
    progress.start("judging", len(answers))
    log(f"judge {cfg.judge} ({ready.safety_judge.style}): {len(answers)} answers")
    replies = judge([(a.prompt, a.completion) for a in answers], progress.advance)
    apply_judge(ready.safety_judge.style, answers, replies, cfg.judge_min_score)
    if judge.failures:
        log(f"judge: {len(judge.failures)} failed tries (first: {judge.failures[0]})")
    for o in judged:
        _rates(o)
        words = [a.judge for a in o.answers if a.judge in ("safe", "unsafe")]
        o.unsafe = words.count("unsafe") / len(words) if words else None


def _effects(outcomes: list[SiteResult]) -> None:
    """Change from the baseline, and its share of the full run-time ablation's change."""
    base = next(o for o in outcomes if o.kind == "baseline").log_odds
    full = next(o for o in outcomes if (o.kind, o.name) == ("run time", "all")).log_odds
    whole = None if base is None or full is None else full - base
    for o in outcomes:
        if o.log_odds is None or base is None:
            continue
        o.delta = o.log_odds - base
        if whole is not None and abs(whole) >= MIN_FULL_EFFECT:
            o.share = o.delta / whole + 0.0  # + 0.0: the baseline's share is 0, not -0


def finding(outcomes: list[SiteResult]) -> str:
    """One plain-English line: how much of the full effect each subset of sites gives."""
    by = {(o.kind, o.name): o for o in outcomes}
    full = by["run time", "all"]
    if full.delta is None or full.share is None:
        return "The full run-time ablation does not move the refusal log-odds: no shares to give."

    def share(kind: str, name: str) -> str:
        o = by[kind, name]
        return "n/a" if o.share is None else f"{100 * o.share:.0f}%"

    return (
        "Removing the direction at run time from the block inputs alone gives "
        f"{share('run time', 'residual')} of the full ablation's effect on refusal "
        f"({full.delta:+.2f} log-odds), from one block's input (the direction's layer) "
        f"{share('run time', ONE_LAYER)}, from the attention outputs alone "
        f"{share('run time', 'attn')}, from the MLP outputs alone {share('run time', 'mlp')}; "
        f"as weight edits, the embeddings alone give {share('weight edit', 'embed')}, attention "
        f"alone {share('weight edit', 'attn')}, MLP alone {share('weight edit', 'mlp')}, all "
        f"writers {share('weight edit', 'all')}."
    )


def study_sites(
    cfg: StudySitesConfig, log: Callable[[str], None] = print, progress: Progress | None = None
) -> SitesResult:
    """Run every condition and write ``sites.json``, ``sites.md`` and ``sites.png``."""

    from ..output import check_target, inputs_of, staged_output
    from ..report import sites_markdown, sites_png

    progress = start_stage(cfg.device, progress)
    target = check_target(cfg.out, inputs_of(cfg), cfg.overwrite)
    ready = prepare(cfg)
    outcomes = _run_conditions(cfg, ready, log, progress)
    if ready.safety_judge is not None:
        _judge_answers(cfg, ready, outcomes, log, progress)
    _effects(outcomes)
    line = finding(outcomes)
    report = {
        "settings": _settings(cfg, ready),
        "refusal_openings": [ready.tok.convert_ids_to_tokens(list(o)) for o in ready.openings],
        "refusal_tokens_from": ready.tokens_from,
        "conditions": [o.to_dict() for o in outcomes],
        "finding": line,
    }
    with staged_output(target) as tmp:
        (tmp / "sites.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "sites.md").write_text(sites_markdown(report))
        sites_png(report, tmp / "sites.png", cfg.model)
    return SitesResult(target, outcomes, line, report)


def _settings(cfg: StudySitesConfig, ready: _Prepared) -> dict:
    from ..prompts import prompt_digest

    direction = ready.direction
    _, _, tied = ready.table.dims(ready.config)
    return {
        "model": cfg.model,
        "revision": ready.revision,
        "direction": str(cfg.direction),
        "direction_sha256": direction.sha256,
        "direction_layer": direction.row,
        # where measure took it (layer = input of block, position = offset from the end)
        "direction_measured_at": {
            k: int(direction.metadata[k])
            for k in ("layer", "position")
            if str(direction.metadata.get(k, "")).lstrip("-").isdigit()
        },
        "tied_policy": ready.table.tied_default if tied else None,  # apply's default
        "prompt_sources": {
            kind: getattr(cfg, kind) or "bundled (test split)" for kind in ("harmful", "harmless")
        },
        "counts": {kind: len(p) for kind, p in ready.prompts.items()},
        # sha256 of each list, one prompt per line in the order used (as measure records them)
        "prompt_hashes": {kind: prompt_digest(p) for kind, p in ready.prompts.items()},
        "n": cfg.n,
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens,
        "judge": cfg.judge,
        "judge_model": cfg.judge_model,
        "judge_style": None if ready.safety_judge is None else ready.safety_judge.style,
        "system": cfg.system,
        "template": None if cfg.template is None else str(cfg.template),
        "dtype": run_dtype(ready.folder, cfg),
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "orthoedit_version": __version__,
    }
