"""Searching the edit against measured outcomes (``orthoedit search``).

``measure`` picks one candidate by first-token log-odds. On real models that choice can fail
both ways: the best bypass score may come with a destroyed model, and the best candidate
under a KL budget may change nothing. Here the edit's parameters are searched instead, each
trial judged by what the edited model does:

* **what is searched**: the direction (a layer as a float, interpolating between the two
  adjacent layers' candidates, each normalized; a post-instruction position), and for the
  attention and MLP outputs separately a per-layer weight profile (peak weight, peak layer,
  width of a linear fall-off, weight at the edge as a fraction of the peak; or with
  ``--profile free`` one weight per layer), and whether the embedding is edited; the space
  can be narrowed (``--direction-layers``, ``--positions``, ``--embed on|off``);
* **how a trial is judged**: the edit is built as the plan ``apply`` would execute
  (``plan.build_plan`` with per-layer scales) and run through ``hooks.plan_hooks`` on the
  model loaded once, so no checkpoint is written. Two objectives, both minimized: the failure
  rate of greedy answers to measure's validation harmful prompts (every answer the judging
  layer, ``orthoedit.judging``, does not call complied: refused, evasive, broken or
  unjudged; word salad that the unedited model finds implausible is broken), and the
  first-token KL on measure's validation harmless prompts (``runtime.scores.mean_kl``, as
  measure scores it); optionally a third, the drop in an lm-eval task's score
  (``evals.tasks.TaskScorer``);
* **the choice**: the lowest failure within a KL budget, or (``--max-failure``, a rate or
  ``measure``: measure's own selection's rate on the same prompts) the lowest KL within a
  failure budget;
* **the optimizer**: Optuna's TPE sampler (multivariate, multi-objective; or with
  ``--objective budget`` one objective aimed at the failure budget: KL plus
  ``--failure-cost`` per prompt failed beyond it), seeded, with the
  study in SQLite (``OUT/study.db``), so an interrupted search resumes. The first trial is
  measure's own selection (its candidate, every writer at full weight), so the search starts
  from it and its point is on the plot as a trial too.

Reproducibility: trial k's parameters are a pure function of the seed and the completed
trials before it (the sampler is re-seeded from (seed, number of completed trials) before
every trial), generation is greedy, and the choice is a pure function of the stored study.
A trial left running by a killed process is marked failed and re-run with the same
parameters (Optuna's retry callback), so a resumed search runs exactly the trials an
uninterrupted one would have.

With ``--confirm`` the chosen edit is then applied and judged by eval safety on held-out
prompts, beside the unedited model (``confirm.py``; generated with ``--backend``, vLLM where
installed): the trial won on the search's own prompts, which flatters it.

Several workers (``--storage URL --study NAME``, each with its own ``--out``) share one study
in a database (``storage.py``): a trial is claimed under a lock in the database, so that the
study ends with exactly ``--trials`` completed trials; a trial whose worker stops beating is
failed and re-run by another; any worker writes the outputs once the study is done. Which
worker runs which trial, and so the trials themselves, then depend on timing.
"""

from __future__ import annotations

from .choice import budget, budget_value, choose, choose_for, none_chosen, objectives, pareto
from .inputs import (
    SPACE_VERSION,
    Ready,
    prepare,
    study_name,
)
from .loop import SearchResult, evaluate_trial, search
from .outputs import apply_args, chosen_sites, report_dict, write_chosen, write_outputs
from .store import measure_params, open_study, sampler_for, start_from_measure
from .trial import (
    TrialResult,
    TrialRunner,
    describe,
    edit_hooks,
    make_runner,
    measure_hooks,
    open_runner,
    ready_hooks,
)

__all__ = [
    "SPACE_VERSION",
    "Ready",
    "SearchResult",
    "TrialResult",
    "TrialRunner",
    "apply_args",
    "budget",
    "budget_value",
    "choose",
    "choose_for",
    "chosen_sites",
    "describe",
    "edit_hooks",
    "evaluate_trial",
    "make_runner",
    "measure_hooks",
    "measure_params",
    "none_chosen",
    "objectives",
    "open_runner",
    "open_study",
    "pareto",
    "prepare",
    "ready_hooks",
    "report_dict",
    "sampler_for",
    "search",
    "start_from_measure",
    "study_name",
    "write_chosen",
    "write_outputs",
]
