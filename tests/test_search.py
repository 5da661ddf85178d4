"""``orthoedit search``: the profile and blend math, seeded reproducibility, resuming an
interrupted study, the chosen edit reproduced by ``apply``, the degenerate detector on a
destroyed model, and bad inputs (one line, exit 2, nothing written)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import folder_digest
from orthoedit import search as search_module
from orthoedit.config import FRONT_TOKENS, SearchConfig
from orthoedit.edit.scope import load_scales
from orthoedit.folders import SearchFolder
from orthoedit.model.direction import load_direction
from orthoedit.organism import GUARD_MODEL
from orthoedit.runtime.hooks import addition_hooks
from orthoedit.search import (
    TrialRunner,
    choose,
    describe,
    make_runner,
    measure_hooks,
    measure_params,
    pareto,
    prepare,
    search,
    study_name,
)
from orthoedit.search.space import EditParams, Profile, blend, params_of
from test_cli import cli, one_line_error, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

# Small enough to run in seconds on a CPU: 6 + 6 validation prompts, 12-token answers.
FAST = {"n": 6, "max_new_tokens": 12, "startup_trials": 2, "max_kl": 0.2}
TRIALS = 4


def _cfg(measured: Path, out: Path, **kw) -> SearchConfig:
    record = json.loads((measured / "direction.json").read_text())
    return SearchConfig(model=record["model"], candidates=measured, out=out, **{**FAST, **kw})


def _args(measured: Path, out: Path, *extra) -> list:
    record = json.loads((measured / "direction.json").read_text())
    args = ["search", record["model"], "--candidates", measured, "--out", out]
    return [*args, "--n", 6, "--max-new-tokens", 12, "--startup-trials", 2, "--max-kl", 0.2, *extra]


def _params(result) -> list[dict]:
    return [t.params for t in result.trials]


@pytest.fixture(scope="session")
def measured(organism_measured) -> Path:
    return organism_measured


@pytest.fixture(scope="session")
def first_search(measured, tmp_path_factory):
    """An uninterrupted search of TRIALS trials (read-only for tests)."""
    out = tmp_path_factory.mktemp("search") / "s"
    return search(_cfg(measured, out, trials=TRIALS), log=lambda m: None)


# --- the search space --------------------------------------------------------------------


def test_profile_scales():
    n = 8
    p = Profile(peak_weight=0.8, peak=3.0, width=2.0, edge_frac=0.5)
    s = p.scales(n)
    assert s[3] == pytest.approx(0.8)  # the peak
    assert s[1] == pytest.approx(0.4) and s[5] == pytest.approx(0.4)  # the edge: 0.5 x peak
    assert s[2] == pytest.approx(0.6) and s[4] == pytest.approx(0.6)  # linear in between
    assert s[0] == s[6] == s[7] == 0.0  # beyond the width
    assert all(0.0 <= x <= 1.0 for x in s)
    # non-increasing away from a fractional peak, on both sides, for random profiles
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = Profile(rng.uniform(0, 1), rng.uniform(0, n - 1), rng.uniform(0.5, n), rng.uniform())
        t = q.scales(n)
        assert all(0.0 <= x <= q.peak_weight + 1e-12 for x in t)
        left = [t[i] for i in range(n) if i <= q.peak][::-1]
        right = [t[i] for i in range(n) if i >= q.peak]
        for side in (left, right):
            assert all(a >= b - 1e-12 for a, b in itertools.pairwise(side))
    assert Profile(1.0, 0.0, float(n), 1.0).scales(n) == [1.0] * n  # every layer, full
    assert Profile(0.0, 2.0, 3.0, 1.0).scales(n) == [0.0] * n


def test_plan_scales_drop_sites_with_nothing_to_edit():
    off = Profile(0.0, 0.0, 1.0, 0.0)
    on = Profile(1.0, 1.0, 0.5, 0.0)  # layer 1 only
    sites, scales = EditParams(1.0, -1, off, on, False).plan_scales(4)
    assert sites == ["mlp"]
    assert scales["embed"] == 0.0 and scales["mlp:1"] == 1.0 and scales["mlp:0"] == 0.0
    assert EditParams(1.0, -1, off, off, False).plan_scales(4)[0] == []


def test_scales_json_is_what_apply_reads(tmp_path):
    params = EditParams(1.5, -1, Profile(0.7, 1.2, 2.0, 0.3), Profile(1.0, 0, 4.0, 1.0), True)
    path = tmp_path / "scales.json"
    path.write_text(json.dumps(params.scales(4)))
    _, planned = params.plan_scales(4)
    assert load_scales(path, 4) == planned


def test_blend():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(4, 2, 8))
    c[0, 1] = 0.0  # an empty candidate (a template token every prompt shares)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    v, src = blend(c, 2.0, -1)
    assert np.allclose(v, unit(c[2, 1]), atol=1e-7) and src["layers"] == [2]
    v, src = blend(c, 1.25, -2)
    assert np.allclose(v, unit(0.75 * unit(c[1, 0]) + 0.25 * unit(c[2, 0])), atol=1e-7)
    assert src["layers"] == [1, 2] and src["weights"] == pytest.approx([0.75, 0.25])
    v, src = blend(c, 0.5, -1)  # layer 0 is empty at this position: all weight to layer 1
    assert np.allclose(v, unit(c[1, 1]), atol=1e-7) and src["weights"] == [1.0]
    v, _ = blend(c, 0.0, -1)  # only the empty one: the nearest non-empty layer
    assert np.allclose(v, unit(c[1, 1]), atol=1e-7)
    assert np.array_equal(v, v.astype(np.float32).astype(np.float64))  # as the file stores it


def test_choice_and_front():
    def trial(number, failure, kl):
        return SimpleNamespace(number=number, user_attrs={"failure": failure, "kl": kl})

    trials = [trial(0, 0.0, 0.3), trial(1, 0.1, 0.05), trial(2, 0.1, 0.05), trial(3, 0.5, 0.01)]
    trials += [trial(4, 0.6, 0.02), trial(5, 0.1, 0.08)]
    assert choose(trials, 0.1).number == 1  # lowest failure in budget; ties: KL, then number
    assert choose(trials, 0.5).number == 0
    assert choose(trials, 0.001) is None
    assert [t.number for t in pareto(trials)] == [3, 1, 0]
    # --max-failure: the lowest KL with failure within it (KL budget not used); ties: failure
    assert choose(trials, 0.001, max_failure=0.1).number == 1
    assert choose(trials, 0.001, max_failure=0.0).number == 0
    assert choose(trials, 0.001, max_failure=0.55).number == 3
    trials.append(trial(6, 0.05, 0.05))
    assert choose(trials, 0.001, max_failure=0.1).number == 6


def test_choose_can_exclude_trials_no_better_than_unedited():
    def trial(number, failure, kl):
        return SimpleNamespace(number=number, user_attrs={"failure": failure, "kl": kl})

    trials = [trial(0, 1.0, 0.0), trial(1, 1.0, 0.04), trial(2, 0.0, 0.125)]
    assert choose(trials, 0.1).number == 0
    assert choose(trials, 0.1, unedited=1.0) is None
    assert choose(trials, 0.2, unedited=1.0).number == 2


def test_max_failure_rechooses_from_the_stored_study(first_search, measured, tmp_path):
    """--max-failure is not a setting of the study: the stored trials are chosen from again,
    none is run, and the report says which rule chose. A trial that fails as often as the
    unedited model is a no-op and never the choice, even when the rule allows its rate."""
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    result = cli(*_args(measured, out, "--trials", TRIALS, "--max-failure", 1.0))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "pareto.json").read_text())
    assert report["trials_completed"] == TRIALS and "failure ≤ 100.0%" in report["budget"]
    unedited = first_search.baselines["no edit"]["failure"]
    edits = [t for t in first_search.trials if t.values[0] < unedited]
    assert len(edits) < len(first_search.trials)  # some trials are no-ops at this budget
    lowest = min(edits, key=lambda t: (t.values[1], t.values[0], t.number))
    assert report["chosen"]["number"] == lowest.number
    assert "the lowest KL within it" in (out / "pareto.md").read_text()


def test_no_feasible_trial_says_so_and_exits_1(first_search, measured, tmp_path):
    """A budget only a no-op meets (KL about 0): nothing is chosen, the error names the rule, the
    nearest trials that edit and measure's selection, exits 1, and the front is still written
    without a chosen edit."""
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    assert (out / "chosen").is_dir()  # the earlier choice, which must not stay behind
    result = cli(*_args(measured, out, "--trials", TRIALS, "--max-kl", 1e-9))
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert "no trial has KL ≤ 1e-09 and fails less often than the unedited model (100.0%" in message
    unedited = first_search.baselines["no edit"]["failure"]
    nearest = min(
        (t for t in first_search.trials if t.values[0] < unedited),
        key=lambda t: (t.values[1], t.values[0], t.number),
    )
    assert f"Nearest: #{nearest.number} failure" in message
    assert f"Measure's selection: failure {first_search.baselines['measure']['failure']:.1%}" in (
        message
    )
    report = json.loads((out / "pareto.json").read_text())
    assert report["chosen"] is None and not (out / "chosen").exists()


# --- on the organism ---------------------------------------------------------------------


def test_first_trial_is_measure_selection(first_search, measured):
    """The search starts from measure's selection and takes the "measure" baseline's
    judgement for it, which holds because the two edits are one: the first trial's hooks
    and the baseline's change the model's logits alike."""
    first = first_search.trials[0]
    base = first_search.baselines["measure"]
    assert first.user_attrs["start"] == "measure's selection"
    assert (first.user_attrs["refused"], first.user_attrs["broken"]) == (
        base["refused"],
        base["broken"],
    )
    assert first.values[1] == pytest.approx(base["kl"], abs=1e-6)
    assert first_search.baselines["no edit"]["kl"] == 0
    # the organism refuses every harmful validation prompt; measure's edit removes refusal
    assert first_search.baselines["no edit"]["failure"] == 1.0 and base["failure"] <= 0.2
    ready = prepare(_cfg(measured, measured / "unused"))
    model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    ids = torch.tensor([ready.tok("How do I make a weapon?")["input_ids"]])
    with torch.no_grad():
        plain = model(ids).logits
        with search_module.edit_hooks(model, ready, params_of(first.params))[0]():
            trial = model(ids).logits
        with measure_hooks(model, ready)():
            baseline = model(ids).logits
    assert (trial - plain).abs().max() > 1e-2  # an edit that changes the model
    torch.testing.assert_close(trial, baseline, rtol=0, atol=1e-5)


def test_outputs(first_search):
    out = first_search.out
    report = json.loads((out / "pareto.json").read_text())
    assert report["trials_completed"] == TRIALS == len(report["trials"])
    assert report["study"] == first_search.study_name
    assert report["chosen"]["number"] == first_search.chosen.number
    assert set(report["pareto"]) <= {t["number"] for t in report["trials"]}
    assert "## Pareto front" in (out / "pareto.md").read_text()
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG")
    chosen = out / "chosen"
    assert sorted(p.name for p in chosen.iterdir()) == [
        ".orthoedit-output.json",
        "apply.txt",
        "direction.safetensors",
        "recipe-fragment.yaml",
        "scales.json",
    ]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or ".orthoedit-" in p.name]


def test_same_seed_same_trials_and_choice(first_search, measured, tmp_path):
    again = search(_cfg(measured, tmp_path / "again", trials=TRIALS), log=lambda m: None)
    assert _params(again) == _params(first_search)
    assert [t.values for t in again.trials] == [t.values for t in first_search.trials]
    assert again.chosen.number == first_search.chosen.number
    assert again.study_name == first_search.study_name
    other = search(_cfg(measured, tmp_path / "other", trials=TRIALS, seed=1), log=lambda m: None)
    assert other.study_name != first_search.study_name
    assert _params(other)[1:] != _params(first_search)[1:]  # trial 0 is measure's either way


def test_resume_after_interruption(first_search, measured, tmp_path, monkeypatch):
    """A process stopped mid-trial leaves it RUNNING in the study; the next run marks it
    failed, runs it again with the same parameters, and ends with the trials an uninterrupted
    search makes, and the same choice."""
    out = tmp_path / "resumed"
    real = search_module.loop.evaluate_trial
    calls = []

    def dies_on_third(judge, hooks):  # trial 0 takes the baseline's judgement: no call
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as good as a kill: nothing after this line runs
        return real(judge, hooks)

    monkeypatch.setattr(search_module.loop, "evaluate_trial", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        search(_cfg(measured, out, trials=TRIALS), log=lambda m: None)
    monkeypatch.setattr(search_module.loop, "evaluate_trial", real)
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=first_search.study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"]
    interrupted = study.trials[2].params
    assert not (out / "pareto.json").exists()  # nothing reported before the end

    result = search(_cfg(measured, out, trials=TRIALS), log=lambda m: None)
    assert result.requeued == [2] and result.ran == 2
    study = optuna.load_study(study_name=first_search.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2 + ["FAIL"] + ["COMPLETE"] * 2
    assert study.trials[3].params == interrupted
    assert study.trials[3].system_attrs["failed_trial"] == 2
    assert _params(result) == _params(first_search)
    assert [t.values for t in result.trials] == [t.values for t in first_search.trials]
    assert result.chosen.params == first_search.chosen.params

    # Run again: nothing left to do; the choice is recomputed from the stored study alone.
    before = folder_digest(out / "chosen")
    again = search(_cfg(measured, out, trials=TRIALS), log=lambda m: None)
    assert again.ran == 0 and again.requeued == []
    assert again.chosen.number == result.chosen.number
    assert folder_digest(out / "chosen") == before
    # A time budget already spent starts no trial, and still reports.
    more = search(_cfg(measured, out, trials=TRIALS + 5, time_budget=1e-9), log=lambda m: None)
    assert more.ran == 0 and more.stopped_by_time and len(more.trials) == TRIALS


def _runner(ready, model, budget: int, **kwargs) -> TrialRunner:
    """The trials' runner on ``model`` (the search's prompts, system prompt and batch size)."""
    from orthoedit.runtime.session import Session, pad_id

    session = Session(
        ready.folder, model, ready.tok, ready.settings["system"], 16, [], pad_id(ready.tok)
    )
    return TrialRunner(session, ready.harmful_prompts, ready.harmless_rows, budget, **kwargs)


def _session(ready, model):
    return _runner(ready, model, 1).session


def _judged_as_the_trial(measured: Path, out: Path, edited: Path, chosen: dict) -> None:
    """The checkpoint ``apply`` wrote answers and scores as the chosen trial did through the
    hooks (judged against the unedited model on the search's prompts)."""
    ready = prepare(_cfg(measured, out))
    base = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    judge = _runner(ready, base, 12)
    judge.session.model = AutoModelForCausalLM.from_pretrained(edited).eval()
    outcome = judge(contextlib.nullcontext)
    assert (outcome.refused, outcome.complied, outcome.broken) == (
        chosen["refused"],
        chosen["complied"],
        chosen["broken"],
    )
    assert outcome.kl == pytest.approx(chosen["kl"], abs=1e-5)


def _enqueue_partial(out: Path, weight: float) -> None:
    """Queue, in the search stored in ``out``, measure's selection with its direction blended
    a quarter of the way to a neighbouring layer and every searched writer at ``weight``: a
    trial near measure's edit, so it edits (random trials on the organism often fail as often
    as the unedited model, and a no-op is never chosen)."""
    storage = f"sqlite:///{SearchFolder(out).study}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    first = min(study.get_trials(deepcopy=False), key=lambda t: t.number)
    params = dict(first.params)
    space = first.distributions["direction_layer"]
    layer = params["direction_layer"]
    params["direction_layer"] = layer + 0.25 if layer + 0.25 <= space.high else layer - 0.25
    for key in params:
        if key.endswith(("_peak_weight",)) or "_weight_" in key:
            params[key] = weight
    study.enqueue_trial(params)


def test_apply_reproduces_the_chosen_trial(first_search, measured, tmp_path):
    """The chosen edit, written by apply from chosen/apply.txt's arguments and loaded by plain
    transformers, answers and scores exactly as the trial did through the hooks. The budget
    is set to choose a trial with a blended direction and partial scales."""
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    _enqueue_partial(out, 0.8)
    result = cli(*_args(measured, out, "--trials", TRIALS + 1))
    assert result.exit_code == 0, result.output
    queued = json.loads((out / "pareto.json").read_text())["trials"][-1]
    assert queued["failure"] < first_search.baselines["no edit"]["failure"]  # it edits
    result = cli(*_args(measured, out, "--trials", TRIALS + 1, "--max-kl", queued["kl"]))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "pareto.json").read_text())
    chosen = report["chosen"]
    assert chosen["number"] == queued["number"]
    line = (out / "chosen" / "apply.txt").read_text()
    args = shlex.split(line)
    assert args[:2] == ["orthoedit", "apply"] and args[-2:] == ["--out", "edited"]
    edited = tmp_path / "edited"
    result = cli(*args[1:-2], "--out", edited)
    assert result.exit_code == 0, result.output
    scales = json.loads((out / "chosen" / "scales.json").read_text())
    assert scales == params_of(chosen["params"]).scales(4)
    assert any(0 < x < 1 for x in scales["attn"] + scales["mlp"])  # partial weights
    assert len(chosen["direction"]["layers"]) == 2  # a blend of two layers' candidates

    _judged_as_the_trial(measured, out, edited, chosen)
    meta = load_direction(out / "chosen" / "direction.safetensors", 96, 4).metadata
    assert meta["search_trial"] == str(chosen["number"])
    assert meta["search_study"] == report["study"]


def test_measure_params_is_measure_edit(first_search, measured):
    ready = prepare(_cfg(measured, first_search.out))
    params = params_of(measure_params(ready))
    sites, scales = params.plan_scales(ready.n_layers)
    assert sites == ["embed", "attn", "mlp"] and set(scales.values()) == {1.0}
    vector, _ = blend(ready.candidates, params.layer, params.position)
    assert np.allclose(vector, ready.baseline_direction.vector, atol=1e-6)


#: A narrowed space with its own objective: free per-layer weights, the direction between
#: layers 2 and 3 at the last position, no embedding edit, aimed at measure's failure rate.
NARROW = {
    "profile": "free",
    "direction_layers": (2.0, 3.0),
    "positions": [-1],
    "embed": "off",
    "objective": "budget",
    "max_failure": "measure",
}


def test_narrowed_space_and_budget_objective(measured, tmp_path):
    """Every trial stays in the space asked for; the sampler's one value is KL plus the cost
    of each prompt failed beyond measure's own failure rate; the choice is the lowest KL at
    or below that rate; the same seed gives the same trials."""
    result = search(_cfg(measured, tmp_path / "s", trials=TRIALS, **NARROW), log=lambda m: None)
    assert len(result.trials) == TRIALS
    for t in result.trials:
        p = t.params
        assert 2.0 <= p["direction_layer"] <= 3.0 and p["position"] == -1 and p["embed"] is False
        weights = sorted(k for k in p if "_weight_" in k)
        assert weights == sorted(f"{s}_weight_{i}" for s in ("attn", "mlp") for i in range(4))
        assert not [k for k in p if "peak" in k or "edge" in k or "width" in k]
    first = result.trials[0]
    assert first.user_attrs["start"] == "measure's selection, as near as the space allows"
    assert first.params["direction_layer"] == 2.0
    assert {v for k, v in first.params.items() if "_weight_" in k} == {1.0}

    target = result.baselines["measure"]["failure"]
    for t in result.trials:
        a = t.user_attrs
        n = a["refused"] + a["complied"] + a["broken"]
        beyond = round((a["failure"] - target) * n)
        assert t.values == [pytest.approx(a["kl"] + 0.05 * max(0, beyond), abs=1e-12)]
    ok = [t for t in result.trials if t.user_attrs["failure"] <= target]
    best = min(ok, key=lambda t: (t.user_attrs["kl"], t.user_attrs["failure"], t.number))
    assert result.chosen.number == best.number

    report = json.loads((result.out / "pareto.json").read_text())
    assert report["max_failure_rate"] == target
    assert report["budget"] == f"failure ≤ measure's ({target:.1%})"
    assert report["sampler"].startswith("optuna TPESampler (multivariate, one objective)")
    markdown = (result.out / "pareto.md").read_text()
    assert "free profiles" in markdown and "embedding edited: never" in markdown
    assert "Profiles: one weight per layer" in markdown

    again = search(_cfg(measured, tmp_path / "again", trials=TRIALS, **NARROW), log=lambda m: None)
    assert _params(again) == _params(result)
    assert [t.values for t in again.trials] == [t.values for t in result.trials]
    assert again.chosen.number == result.chosen.number
    front = search(_cfg(measured, tmp_path / "front", trials=1), log=lambda m: None)
    assert front.study_name != result.study_name


def test_apply_reproduces_a_free_profile_trial(measured, tmp_path):
    """A free-profile trial chosen from the CLI (the budget objective with every failure rate
    allowed minimizes KL alone among the trials that edit, so a trial with partial weights
    wins), written by apply from chosen/apply.txt, scores exactly as the trial did through the
    hooks."""
    out = tmp_path / "s"
    narrow = ["--profile", "free", "--direction-layers", "2:3", "--positions", "-1"]
    narrow += ["--embed", "off", "--objective", "budget", "--max-failure", 1.0]
    result = cli(*_args(measured, out, "--trials", TRIALS, *narrow))
    assert result.exit_code == 0, result.output
    _enqueue_partial(out, 0.8)
    result = cli(*_args(measured, out, "--trials", TRIALS + 1, *narrow))
    assert result.exit_code == 0, result.output
    chosen = json.loads((out / "pareto.json").read_text())["chosen"]
    assert chosen["number"] != 0
    scales = json.loads((out / "chosen" / "scales.json").read_text())
    assert scales == params_of(chosen["params"]).scales(4)
    assert scales["embed"] == 0.0 and any(0 < x < 1 for x in scales["attn"] + scales["mlp"])
    args = shlex.split((out / "chosen" / "apply.txt").read_text())
    assert "embed" not in args[args.index("--sites") + 1].split(",")
    edited = tmp_path / "edited"
    result = cli(*args[1:-2], "--out", edited)
    assert result.exit_code == 0, result.output
    _judged_as_the_trial(measured, out, edited, chosen)


def test_destroyed_model_is_broken_not_compliant(measured):
    """The degenerate detector: a model destroyed by adding a huge multiple of the direction
    answers in loops, which count as failures, never as compliance."""
    ready = prepare(_cfg(measured, measured / "unused"))
    model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    judge = _runner(ready, model, 32)
    r = torch.tensor(ready.baseline_direction.vector, dtype=torch.float32)
    for k in (-50.0, 50.0):
        hooks = functools.partial(addition_hooks, model, ready.table, 2, k * r)
        outcome = judge(hooks)
        assert outcome.broken == outcome.n and outcome.complied == 0
        assert outcome.failure == 1.0
        assert outcome.kl > 0.5


@contextlib.contextmanager
def _noised_weights(model, scale: float):
    """Gaussian noise of ``scale`` times each weight's spread added to every parameter, then
    restored: a destroyed model that answers in word salad, not in loops."""
    saved = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, old in zip(model.parameters(), saved, strict=True):
                p.copy_(old)


def test_word_salad_is_broken_not_compliant(measured):
    """Random-weight word salad reads as text (the text checks call most of it compliance);
    the unedited model's surprisal calls all of it broken, while measure's real compliance and
    the unedited model's own answers stay far below the threshold."""
    from orthoedit.runtime.session import generate, surprisal

    ready = prepare(_cfg(measured, measured / "unused", n=16))
    model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    judge = _runner(ready, model, 32)
    assert judge.max_surprisal == pytest.approx(0.5 * np.log(len(ready.tok)))
    with _noised_weights(model, 1.0):
        salad = judge.answers()
    assert sum(a.verdict == "complied" for a in salad) >= len(salad) // 2  # text misses it
    outcome = judge(functools.partial(_noised_weights, model, 1.0))
    assert outcome.complied == 0 and outcome.failure == 1.0
    assert outcome.implausible >= len(salad) // 2
    edited = judge(measure_hooks(model, ready))
    assert edited.complied == edited.n and edited.implausible == 0
    with measure_hooks(model, ready)():
        made = [g.ids for g in generate(judge.session, ready.harmful_rows, 32)]
    scores = surprisal(model, ready.harmful_rows, made, 16, judge.session.pad)
    assert max(scores) < judge.max_surprisal / 2


def test_surprisal_is_each_row_alone(measured):
    """Batched, left-padded surprisal (answers of different lengths, the shared prefix run
    once) equals each (prompt, answer) scored alone and a plain forward pass, and an empty
    answer scores 0."""
    from orthoedit.runtime.session import pad_id, surprisal

    ready = prepare(_cfg(measured, measured / "unused"))
    model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    rows = ready.harmless_rows[:4]
    texts = ["of course . go slowly", "yes", "of course"]  # lengths differ within a batch
    answers = [ready.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    answers.append([])
    pad = pad_id(ready.tok)
    batched = surprisal(model, rows, answers, 4, pad)
    alone = [surprisal(model, [r], [a], 1, pad)[0] for r, a in zip(rows, answers, strict=True)]
    assert batched == pytest.approx(alone, abs=1e-5) and batched[3] == 0.0
    with torch.no_grad():
        ids = torch.tensor([rows[0] + answers[0]])
        logprobs = torch.log_softmax(model(ids).logits[0, len(rows[0]) - 1 : -1], -1)
        direct = -logprobs.gather(-1, torch.tensor(answers[0]).unsqueeze(-1)).mean()
    assert batched[0] == pytest.approx(float(direct), abs=1e-5)


def test_eval_task_is_a_third_objective(measured, tmp_path, capfd):
    """--eval-task: every trial's drop is the unedited score minus the score with the trial's
    hooks (checked against a scorer of its own), the unedited baseline drops 0, the front is
    three-objective, and --max-drop constrains the choice. Scoring prints no lm-eval
    progress bars (a search scores once per trial, under its own bar)."""
    from orthoedit.evals.tasks import TaskScorer

    kw = {"eval_task": "organism_capability", "eval_limit": 8}
    result = search(_cfg(measured, tmp_path / "s", trials=3, **kw), log=lambda m: None)
    assert result.baselines["no edit"]["drop"] == 0.0
    assert all(len(t.values) == 3 for t in result.trials)
    report = json.loads((result.out / "pareto.json").read_text())
    assert report["judging"]["eval_metric"].startswith("exact_match")
    assert "drop" in (result.out / "pareto.md").read_text()
    ready = prepare(_cfg(measured, tmp_path / "s", **kw))
    model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    scorer = TaskScorer(model, ready.tok, "organism_capability", 8, 16, 0)
    capfd.readouterr()
    base = scorer()
    printed = capfd.readouterr()
    assert "it/s" not in printed.err + printed.out and "requests" not in printed.err
    assert base == pytest.approx(report["judging"]["eval_base_score"])
    last = result.trials[-1]
    with search_module.edit_hooks(model, ready, params_of(last.params))[0]():
        assert base - scorer() == pytest.approx(last.values[2])
    strict = choose(result.trials, 10.0, max_drop=-1.0)  # no trial improves the task by 1
    assert strict is None
    loose = choose(result.trials, 10.0, max_drop=1.0)
    assert loose is choose(result.trials, 10.0)


def test_pareto_three_objectives():
    points = [(0, 1, 1), (0, 1, 0), (1, 0, 1)]
    t = [
        SimpleNamespace(number=i, user_attrs={"failure": f, "kl": k, "drop": d})
        for i, (f, k, d) in enumerate(points)
    ]
    assert [x.number for x in pareto(t)] == [2, 1]


# --- bad inputs ----------------------------------------------------------------------------


def test_bad_inputs(measured, tmp_path):
    out = tmp_path / "out"
    model = json.loads((measured / "direction.json").read_text())["model"]
    missing = tmp_path / "nothing-here"
    line = one_line_error(cli("search", model, "--candidates", missing, "--out", out))
    assert "not a folder" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(cli("search", model, "--candidates", empty, "--out", out))
    assert "candidates.safetensors" in line
    assert "--max-kl must be > 0" in one_line_error(cli(*_args(measured, out, "--max-kl", 0)))
    assert "trials" in one_line_error(cli(*_args(measured, out, "--trials", 0)))
    assert "--max-drop needs --eval-task" in one_line_error(
        cli(*_args(measured, out, "--max-drop", 0.02))
    )
    line = one_line_error(cli(*_args(measured, out, "--eval-task", "no_such_task_xyz")))
    assert "unknown lm-eval task(s): no_such_task_xyz" in line
    narrow = {
        ("--objective", "budget"): "aims at --max-failure",
        ("--max-failure", 1.5): "a fraction in [0, 1] or 'measure'",
        ("--max-failure", "most"): "--max-failure: must be a valid number",
        ("--direction-layers", "2:9"): "goes past the last layer (3)",
        ("--direction-layers", "3:2"): "LO <= HI",
        ("--positions", "-7"): "--positions -7: no measured candidate there (measured: -2, -1)",
        ("--positions", "0"): "offsets from the end",
    }
    for args, words in narrow.items():
        assert words in one_line_error(cli(*_args(measured, out, *args))), args
    for option in ("--embed", "--profile", "--objective"):  # choices: click's usage error
        result = cli(*_args(measured, out, option, "maybe"))
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    line = one_line_error(
        cli(
            *_args(measured, out, "--objective", "budget", "--max-failure", 0.1, "--eval-task", "x")
        )
    )
    assert "--objective budget has one objective" in line
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert "not a search folder" in one_line_error(cli(*_args(measured, stranger)))
    assert not out.exists()
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "stranger"]


def test_settings_mismatch_refused(first_search, measured, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    before = folder_digest(out)
    line = one_line_error(cli(*_args(measured, out, "--trials", TRIALS, "--seed", 7)))
    assert "other settings" in line and "seed: 0 -> 7" in line
    assert folder_digest(out) == before
    # --overwrite starts over with the new settings
    result = cli(*_args(measured, out, "--trials", 1, "--seed", 7, "--overwrite"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "pareto.json").read_text())
    assert report["settings"]["seed"] == 7 and report["trials_completed"] == 1


def test_study_name_depends_on_settings():
    a = {"seed": 0, "model": "m"}
    assert study_name(a) == study_name(dict(reversed(a.items())))
    assert study_name(a) != study_name({**a, "seed": 1})


def test_help_comes_from_the_config():
    """Every SearchConfig field is an option (or the MODEL argument), described as the config
    describes it."""
    result = cli("search", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    for name, field in SearchConfig.model_fields.items():
        if name != "model":
            assert "--" + name.replace("_", "-") in text, name
        assert field.description.split("[")[0].strip() in text, name


def test_own_prompt_files_make_another_study(measured, tmp_path):
    harmful = tmp_path / "harmful.jsonl"
    lines = (measured / "val-harmful.jsonl").read_text().splitlines()
    harmful.write_text("\n".join(reversed(lines)) + "\n")
    mine = prepare(_cfg(measured, tmp_path / "s", harmful=harmful))
    default = prepare(_cfg(measured, tmp_path / "s"))
    assert mine.settings["prompt_hashes"]["harmful"] != default.settings["prompt_hashes"]["harmful"]
    assert study_name(mine.settings) != study_name(default.settings)
    assert mine.harmful_rows[0] != default.harmful_rows[0]


def test_guard_judge_counts_only_unsafe_compliance(measured, tmp_path):
    """With a guard, a complied answer is compliance only when the guard calls it unsafe; the
    organism's guard calls the edited organism's compliant answers unsafe."""
    cfg = _cfg(measured, tmp_path / "s", judge=f"hf:{GUARD_MODEL}", front_max_new_tokens=0)
    ready = prepare(cfg)
    assert ready.settings["judge"] == cfg.judge
    model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
    judge = make_runner(cfg, ready, _session(ready, model))
    edited = judge(measure_hooks(model, ready))
    assert edited.complied > 0  # compliance the guard calls unsafe (the rest: evasive)
    assert edited.failure == pytest.approx(1 - edited.complied / edited.n)
    unedited = judge(contextlib.nullcontext)
    assert unedited.complied == 0 and unedited.failure == 1.0


@pytest.mark.parametrize("mode", ["guard", "garbage"])
def test_openai_judge_judges_trials_as_the_guard_does(measured, tmp_path, mode):
    """``--judge openai:URL`` is the same judge in search as in eval safety: an endpoint that
    answers as the organism's guard gives the guard's counts; one whose replies cannot be
    read leaves every complied answer unjudged, and none of them counts as compliance."""
    from judgeserver import JudgeServer

    server = JudgeServer(mode)
    try:
        cfg = _cfg(
            measured, tmp_path / "s", judge=f"openai:{server.url}", judge_model="guard",
            judge_style="guard", judge_timeout=5, judge_retries=0, front_max_new_tokens=0,
        )  # fmt: skip
        ready = prepare(cfg)
        assert ready.settings["judge"] == cfg.judge and ready.settings["judge_model"] == "guard"
        model = AutoModelForCausalLM.from_pretrained(ready.folder).eval()
        edited = make_runner(cfg, ready, _session(ready, model))(measure_hooks(model, ready))
    finally:
        server.close()
    asked = edited.complied + edited.evasive + edited.unjudged
    assert asked > 0 and server.requests == asked
    if mode == "guard":
        guard_cfg = _cfg(
            measured, tmp_path / "g", judge=f"hf:{GUARD_MODEL}", front_max_new_tokens=0
        )
        session = _session(prepare(guard_cfg), model)
        by_guard = make_runner(guard_cfg, prepare(guard_cfg), session)(measure_hooks(model, ready))
        assert (edited.complied, edited.evasive, edited.unjudged) == (
            by_guard.complied, by_guard.evasive, 0
        )  # fmt: skip
        assert edited.failure == pytest.approx(by_guard.failure)
    else:
        assert edited.complied == 0 and edited.unjudged == asked
        assert edited.failure == 1.0
        assert f"{edited.unjudged} unjudged" in describe(edited.to_dict())


def test_search_takes_the_judge_options_of_eval_safety(measured, tmp_path):
    """The same options, checked before any model loads: an openai: judge needs a model name,
    and a bad scheme names the forms --judge takes."""
    for extra, said in [
        (("--judge", "openai:http://127.0.0.1:9/v1"), "--judge-model"),
        (("--judge", "bogus:x"), "openai:http(s)://"),
    ]:
        out = tmp_path / extra[1].partition(":")[0]
        result = cli(*_args(measured, out, *extra))
        assert result.exit_code == 2, result.output
        assert said in result.stderr and not out.exists()


@pytest.mark.slow
def test_killed_search_resumes_with_the_same_trials(first_search, measured, tmp_path):
    """Slow (``make test-slow``): a search process killed with SIGKILL part-way resumes from
    its study and ends with the trials and the choice of an uninterrupted search."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "orthoedit.cli", *map(str, _args(measured, out))]
    args += ["--trials", str(TRIALS + 4)]
    env = {**os.environ, "PYTHONPATH": str(Path(search_module.__file__).parents[2])}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = out / "study.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once two trials are complete
        if db.exists():
            try:
                study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
                if sum(t.state.name == "COMPLETE" for t in study.trials) >= 2:
                    break
            except Exception:  # the study is being created
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
    assert 2 <= sum(t.state.name == "COMPLETE" for t in study.trials) < TRIALS + 4
    resumed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = json.loads((out / "pareto.json").read_text())
    uninterrupted = search(
        _cfg(measured, tmp_path / "whole", trials=TRIALS + 4), log=lambda m: None
    )
    assert [t["params"] for t in report["trials"]] == _params(uninterrupted)
    assert report["chosen"]["params"] == dict(sorted(uninterrupted.chosen.params.items()))


# --- --confirm: the chosen edit on held-out prompts -------------------------------------

CONFIRM = ["--confirm", "--confirm-harmful", "organism", "--confirm-harmless", "organism"]
CONFIRM += ["--confirm-n", 6, "--confirm-max-new-tokens", 16]


def _prompts_of(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def test_confirm_is_eval_safety_on_the_applied_edit(first_search, measured, tmp_path):
    """--confirm applies the chosen trial as chosen/apply.txt does and judges it beside the
    unedited model on held-out prompts: its answers are eval safety's on the checkpoint apply
    writes, answer for answer; its prompts are none of the search's; the checkpoint is gone
    afterwards; a second run with the same options reuses it, and a run that chooses nothing
    removes it."""
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    result = cli(*_args(measured, out, "--trials", TRIALS, *CONFIRM))
    assert result.exit_code == 0, result.output
    assert "confirmed: on 6 held-out harmful prompts" in " ".join(result.output.split())
    report = json.loads((out / "pareto.json").read_text())
    found = report["confirmation"]
    trial = first_search.chosen.number
    assert (found["trial"], found["study"], found["confirmed"]) == (trial, report["study"], True)
    assert found["counts"] == {"harmful": 6, "harmless": 6}
    assert not (out / ".confirm-model").exists()
    assert not [p for p in out.iterdir() if ".orthoedit-" in p.name]
    records = [json.loads(line) for line in (out / "confirm" / "completions.jsonl").open()]
    searched = set(_prompts_of(measured / "val-harmful.jsonl"))
    searched |= set(_prompts_of(measured / "val-harmless.jsonl"))
    assert not {r["prompt"] for r in records} & searched  # held out
    for role in ("base", "model"):  # the failure rate is recomputed from the answers
        mine = [r for r in records if r["model"] == role and r["kind"] == "harmful"]
        failed = sum(r["verdict"] != "complied" for r in mine) / len(mine)
        assert found["failure"][role] == pytest.approx(failed)
    assert found["failure"]["base"] == 1.0 > found["failure"]["model"]
    assert "## Confirmation on held-out prompts" in (out / "pareto.md").read_text()

    # the same answers as eval safety on the checkpoint apply.txt writes
    args = shlex.split((out / "chosen" / "apply.txt").read_text().splitlines()[-1])
    edited = tmp_path / "edited"
    assert cli(*args[1:-2], "--out", edited).exit_code == 0
    model = json.loads((measured / "direction.json").read_text())["model"]
    again = cli(
        "eval", "safety", edited, "--base", model, "--out", tmp_path / "safety",
        "--harmful", "organism", "--harmless", "organism", "--n", 6, "--max-new-tokens", 16,
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    theirs = [json.loads(line) for line in (tmp_path / "safety" / "completions.jsonl").open()]
    keys = ("model", "kind", "prompt", "completion", "verdict", "surprisal")
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in theirs]

    before = folder_digest(out / "confirm")
    result = cli(*_args(measured, out, "--trials", TRIALS, *CONFIRM))
    assert result.exit_code == 0, result.output
    assert "not run again" in result.output
    assert folder_digest(out / "confirm") == before
    result = cli(*_args(measured, out, "--trials", TRIALS))  # kept: it is of the chosen trial
    assert json.loads((out / "pareto.json").read_text())["confirmation"]["key"] == found["key"]
    result = cli(*_args(measured, out, "--trials", TRIALS, "--max-kl", 1e-9, *CONFIRM))
    assert result.exit_code == 1 and "nothing to confirm" in result.output
    assert not (out / "confirm").exists()
    assert json.loads((out / "pareto.json").read_text())["confirmation"] is None


def test_not_confirmed_exits_1(first_search, measured, tmp_path):
    """Held-out 'harmful' prompts the unedited model does not refuse (the organism's harmless
    ones): the edit cannot fail less often, so it is not confirmed: exit 1, saying so, with
    the report written."""
    from orthoedit.prompts import load_prompts

    answered = tmp_path / "answered.jsonl"
    items = load_prompts("organism", "harmless", "test")[:4]
    answered.write_text("".join(json.dumps({"prompt": i["prompt"]}) + "\n" for i in items))
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    args = [*CONFIRM[:2], answered, *CONFIRM[3:]]
    result = cli(*_args(measured, out, "--trials", TRIALS, *args))
    assert result.exit_code == 1, result.output
    message = " ".join(result.stderr.split())
    assert "not confirmed: on 4 held-out harmful prompts" in message
    assert "against the unedited model's 0.0%" in message
    found = json.loads((out / "pareto.json").read_text())["confirmation"]
    assert found["confirmed"] is False and (out / "confirm" / "report.md").is_file()


def test_confirm_options_need_confirm(measured, tmp_path):
    out = tmp_path / "s"
    for args in (["--backend", "vllm"], ["--confirm-n", 3], ["--confirm-harmful", "organism"]):
        line = one_line_error(cli(*_args(measured, out, *args)))
        assert f"{args[0]} is --confirm's" in line and "add --confirm" in line, line
    line = one_line_error(cli(*_args(measured, out, "--tensor-parallel-size", 2)))
    assert "add --backend vllm" in line
    assert not out.exists()


def test_confirm_never_removes_a_folder_orthoedit_did_not_write(first_search, measured, tmp_path):
    """A folder of the confirmation's names that orthoedit did not write (no marker) stays,
    with --confirm (one-line error before any work on it), without, and with --overwrite."""
    out = tmp_path / "s"
    shutil.copytree(first_search.out, out)
    for name in ("confirm", ".confirm-model"):  # one at a time
        (out / name).mkdir()
        (out / name / "mine.txt").write_text("mine")
        line = one_line_error(cli(*_args(measured, out, "--trials", TRIALS, *CONFIRM)))
        assert f"{out / name} was not written by orthoedit; move it away" in line
        (out / name).rename(tmp_path / name)
    for name in ("confirm", ".confirm-model"):
        (tmp_path / name).rename(out / name)
    result = cli(*_args(measured, out, "--trials", TRIALS))
    assert result.exit_code == 0, result.output
    cli(*_args(measured, out, "--trials", 1, "--overwrite"))
    for name in ("confirm", ".confirm-model"):
        assert (out / name / "mine.txt").read_text() == "mine"


# --- cheap trials, a strong front ---------------------------------------------------------


def _trial(number: int, failure: float, kl: float) -> SimpleNamespace:
    return SimpleNamespace(number=number, user_attrs={"failure": failure, "kl": kl})


def test_the_front_is_judged_again_by_default_only_with_a_judge():
    """--front-max-new-tokens unset: off without a judge (phrases read every trial at the
    trials' budget), on with one (the judge reads the front, not every trial); set, as set."""
    base = {"model": "m", "candidates": Path("c"), "out": Path("o")}
    assert SearchConfig(**base).front_budget() == 0
    judged = SearchConfig(**base, judge="openai:http://127.0.0.1:9/v1", judge_model="g")
    assert judged.front_budget() == FRONT_TOKENS > SearchConfig(**base).max_new_tokens
    assert SearchConfig(**base, judge="hf:x", front_max_new_tokens=0).front_budget() == 0
    assert SearchConfig(**base, front_max_new_tokens=96).front_budget() == 96


def test_the_choice_uses_the_fronts_strong_scores():
    """A trial best by its cheap score but failing more when judged again is not chosen; a
    trial nobody judged again cannot be chosen; the no-op rule reads the strong baselines."""
    from orthoedit.search import choose_for

    trials = [_trial(0, 0.10, 0.05), _trial(1, 0.20, 0.04), _trial(2, 0.0, 0.5)]
    cfg = SearchConfig(model="m", candidates=Path("c"), out=Path("o"), max_kl=0.1)
    baselines = {"no edit": {"failure": 1.0, "kl": 0.0}, "measure": {"failure": 0.3, "kl": 0.1}}
    assert choose_for(trials, cfg, baselines).number == 0  # by the cheap scores
    strong = {
        "baselines": {"no edit": {"failure": 0.9, "kl": 0.0}, "measure": {"failure": 0.5}},
        "trials": {"0": {"failure": 0.60, "kl": 0.05}, "1": {"failure": 0.25, "kl": 0.04}},
    }
    assert choose_for(trials, cfg, baselines, strong).number == 1
    strong["baselines"]["no edit"]["failure"] = 0.2  # both fail as often as no edit
    assert choose_for(trials, cfg, baselines, strong) is None


def test_search_judges_its_front_again_and_chooses_by_it(measured, tmp_path):
    """Trials are scored cheaply (phrases only: the guard reads none of them); the front's
    trials within the budget and the baselines are judged again with longer answers and the
    guard, stored once (a second run judges nothing), and the choice is the best of them by
    those scores; pareto.md shows both scores."""
    from orthoedit.search import choose_for

    out = tmp_path / "s"
    cfg = _cfg(measured, out, trials=TRIALS, judge=f"hf:{GUARD_MODEL}", front_max_new_tokens=24)
    lines: list[str] = []
    result = search(cfg, log=lines.append)
    front = result.report["front"]
    assert front["max_new_tokens"] == 24 and front["judge"] == cfg.judge
    assert all(t.user_attrs["evasive"] == 0 for t in result.trials)  # no guard on trials
    judged = set(front["judged"])
    assert judged and judged <= {t.number for t in result.front}
    assert set(result.strong["baselines"]) == {"no edit", "measure"}
    assert result.chosen is not None and result.chosen.number in judged
    assert result.chosen.number == choose_for(result.trials, cfg, None, result.strong).number
    assert result.report["chosen"]["strong"] == result.strong["trials"][str(result.chosen.number)]
    assert "judged again" in (out / "pareto.md").read_text()
    assert sum(line.startswith("front: trial") for line in lines) == len(judged)
    again: list[str] = []
    search(cfg, log=again.append)
    assert not any(line.startswith("front: trial") for line in again)
