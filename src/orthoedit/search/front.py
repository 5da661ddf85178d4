"""Cheap trials, a strong front: trials are scored cheaply (``--max-new-tokens`` answers,
judged by phrases), which is what the sampler needs; before the choice, the Pareto front's
trials that the choice rule can pick, and the two baselines (no edit, measure's selection),
are judged again with long answers (``--front-max-new-tokens``) and ``--judge``. The choice
uses these strong scores (``choice.choose_for``); pareto.md shows both.

The strong scores are stored in the study (``study.user_attrs["front"]``, keyed by the
settings that make them), so a resumed or joined search judges each trial once.
"""

from __future__ import annotations

import contextlib
import json

from ..config import SearchConfig
from .choice import budget, objectives, pareto
from .space import params_of
from .trial import edit_hooks, measure_hooks

FRONT = "front"


def settings_key(cfg: SearchConfig) -> str:
    """What makes a strong score: its budget and its judge."""
    made = {
        "max_new_tokens": cfg.front_budget(),
        "judge": cfg.judge,
        "judge_model": cfg.judge_model,
        "judge_style": cfg.judge_style,
        "judge_min_score": cfg.judge_min_score,
    }
    return json.dumps(made, sort_keys=True)


def candidates(trials: list, cfg: SearchConfig) -> list:
    """The front's trials the choice rule can pick on KL and drop (``--max-kl`` binds only the
    KL rule; every front trial under ``--max-failure``)."""
    found = []
    for t in pareto(trials):
        values = objectives(t)
        if cfg.max_failure is None and values[1] > cfg.max_kl:
            continue
        if cfg.max_drop is not None and len(values) > 2 and values[2] > cfg.max_drop:
            continue
        found.append(t)
    return found


def stored(study, cfg: SearchConfig) -> dict:
    """The strong scores this study holds for ``cfg``'s settings (empty ones where none)."""
    return study.user_attrs.get(FRONT, {}).get(settings_key(cfg), {"baselines": {}, "trials": {}})


def judge_front(cfg: SearchConfig, study, storage, work, trials: list) -> dict | None:
    """The strong scores of the candidates and baselines (judging the ones not yet stored);
    None when ``--front-max-new-tokens`` is 0."""
    if cfg.front_budget() == 0:
        return None
    strong = stored(study, cfg)
    todo = [t for t in candidates(trials, cfg) if str(t.number) not in strong["trials"]]
    missing = [name for name in ("no edit", "measure") if name not in strong["baselines"]]
    if not todo and not missing:
        return strong
    runner, model = work.loaded(study, storage)
    budget = cfg.front_budget()
    judge = f" and {cfg.judge}" if cfg.judge else ""
    work.progress.start(
        f"front: judging {len(todo)} trials and {len(missing)} baselines again "
        f"({budget} tokens{judge})",
        len(todo) + len(missing),
    )
    hooks = {"no edit": contextlib.nullcontext, "measure": measure_hooks(model, work.ready)}
    for name in missing:
        strong["baselines"][name] = runner.evaluate(hooks[name], budget, True).to_dict()
        work.progress.advance(1)
    for t in todo:
        edit = edit_hooks(model, work.ready, params_of(t.params))[0]
        result = runner.evaluate(edit, budget, True).to_dict()
        strong["trials"][str(t.number)] = result
        work.log(f"front: trial {t.number}: failure {result['failure']:.1%} with {budget} tokens")
        work.progress.advance(1)
    with storage.exclusive(study):
        every = dict(study.user_attrs.get(FRONT, {}))
        every[settings_key(cfg)] = strong
        study.set_user_attr(FRONT, every)
    return strong


def add_to_report(report: dict, strong: dict | None, cfg: SearchConfig) -> None:
    """pareto.json's record of the strong scores: the settings and baselines under
    ``front``, and each re-judged trial's (the chosen one's too) under ``strong``."""
    if strong is None:
        report["front"] = None
        return
    report["front"] = {
        **json.loads(settings_key(cfg)),
        "baselines": strong["baselines"],
        "judged": sorted(int(n) for n in strong["trials"]),
    }
    report["budget"] = budget(cfg, strong["baselines"])
    for entry in [*report["trials"], *([report["chosen"]] if report["chosen"] else [])]:
        entry["strong"] = strong["trials"].get(str(entry["number"]))
