"""Recipes and `orthoedit run`: validation, stages, resume, and reproducible artifacts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from orthoedit.edit.licenses import name_problem
from orthoedit.errors import BadInputError
from orthoedit.pipeline.recipe import SECTIONS, load_recipe, stage_configs
from orthoedit.pipeline.run import run
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ORGANISM = ROOT / "src" / "orthoedit" / "organism"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path, tmp_path):
    recipe, base = load_recipe(path)
    configs = stage_configs(recipe, base, tmp_path)
    assert configs  # every section became a validated stage
    text = path.read_text()
    if "# publish:" not in text:
        return
    # The commented-out publish section validates once uncommented, and its repo name keeps
    # the source license's naming rule.
    live = tmp_path / path.name
    head, tail = text.split("# publish:")
    live.write_text(head + "publish:" + re.sub(r"^# ", "", tail, flags=re.M))
    recipe, base = load_recipe(live)
    push = stage_configs(recipe, base, tmp_path)["publish"]
    assert push.model_dir == tmp_path / "model" and push.eval == tmp_path
    family = re.match(r"llama-(3\.\d)", path.stem)
    if family:
        assert name_problem(push.repo_id, {"license": f"llama{family[1]}"}) is None
        assert name_problem("me/abliterated-model", {"license": f"llama{family[1]}"})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model: m\nfoo: 1\n", "unknown key 'foo' (allowed: bench, direction, edit"),
        ("model: m\nmeasure: {n_trian: 3}\n", "unknown key 'measure.n_trian' (allowed:"),
        ("model: m\nmeasure: {n_train: -1}\n", "measure.n_train: Input should be greater"),
        ("model: m\nedit: {out: x}\n", "edit.out is set by the run"),
        ("model: m\nbench: {overwrite: true}\n", "bench.overwrite is set by the run"),
        ("model: m\ndirection: nope.safetensors\n", "direction file"),
        ("- a\n- b\n", "expected a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
        ("measure: {}\n", "model: Field required"),
        ("model: m\nsearch: {trials: 0}\n", "search.trials: Input should be greater"),
        ("model: m\nsearch: {candidates: x}\n", "search.candidates is set by the run"),
        ("model: m\nsearch: {}\nedit: {sites: [mlp]}\n", "edit.sites is set by the search"),
        ("model: m\nsearch: {}\nedit: {scales: s.json}\n", "edit.scales is set by the search"),
    ],
)
def test_bad_recipes(tmp_path, text, needle):
    with pytest.raises(BadInputError, match=None) as info:
        recipe, base = load_recipe(_write(tmp_path, text))
        stage_configs(recipe, base, tmp_path / "out")
    assert needle in str(info.value)


def test_run_cli_bad_inputs(tmp_path):
    missing = cli("run", tmp_path / "none.yaml", "--out", tmp_path / "o")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    recipe = _write(tmp_path, f"model: {ORGANISM / 'chat'}\nverify: null\n")
    bad_stage = cli("run", recipe, "--out", tmp_path / "o", "--from", "bench")
    assert bad_stage.exit_code == 2 and "stages are direction, model" in bad_stage.stderr
    assert not (tmp_path / "o").exists()


def test_organism_recipe_end_to_end_and_resume(organism_run):
    """The shipped offline recipe: every stage runs, the refusal drops as in the organism's
    card, capability holds; a second run skips everything; --only reruns one stage."""
    out = organism_run
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == ["direction", "model", "verify", "bench", "safety", "kl"]
    assert state["stages"]["verify"]["passed"] is True
    kl = json.loads((out / "eval" / "kl.json").read_text())
    assert kl["edited"] == str(out / "model") and kl["prompts"] == 64
    assert 0 < kl["first_token_kl"] == state["stages"]["kl"]["first_token_kl"]
    assert state["stages"]["bench"]["regressions"] == []
    harmful = state["stages"]["safety"]["summary"]
    assert harmful["base"]["harmful"]["overall"]["refusal"] >= 0.95
    assert harmful["model"]["harmful"]["overall"]["refusal"] <= 0.05
    for name in ("direction", "model", "verify.json", "eval/bench", "eval/safety", "eval/kl.json"):
        assert (out / name).exists(), name

    log = (out / "run.log").read_text()  # every line of the run, with the time
    for k, name in enumerate(state["stages"], 1):
        assert re.search(rf"^\S+ \S+ \[{k}/6\] {name}: done in [0-9.]+ s$", log, re.M), name
    assert "lm-eval on the edited model" in log and "%|" not in log

    again = cli("run", ROOT / "recipes" / "organism.yaml", "--out", out)
    assert again.exit_code == 0, again.output
    assert again.stderr.count("up to date, skipped") == 6
    assert (out / "run.log").read_text().startswith(log)  # appended to
    stages = []
    run(
        ROOT / "recipes" / "organism.yaml",
        out,
        log=lambda m: None,
        on_stage=lambda *s: stages.append(s),
    )
    assert stages == [(k, 6, name) for k, name in enumerate(state["stages"], 1)]
    assert json.loads((out / "run.json").read_text())["stages"] == state["stages"]

    only = cli("run", ROOT / "recipes" / "organism.yaml", "--out", out, "--only", "verify")
    assert only.exit_code == 0, only.output
    assert "verify: running" in only.stderr and "bench: running" not in only.stderr


def test_interrupted_stage_reruns_alone_and_artifacts_are_reproducible(tmp_path):
    """A stage whose output is gone (an interrupted run) runs again, alone; two runs of the
    same recipe give byte-identical direction and model shards."""
    text = (
        f"model: {ORGANISM / 'chat'}\n"
        f"measure: {{harmful: {ORGANISM / 'prompts/harmful-train.jsonl'}, "
        f"harmless: {ORGANISM / 'prompts/harmless-train.jsonl'}, layer: 2, position: -1, "
        "refusal_tokens: sorry, n_train: 64, n_val: 8}\n"
        "verify: null\n"
    )
    recipe = _write(tmp_path, text)
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        result = cli("run", recipe, "--out", out)
        assert result.exit_code == 0, result.output
    for name in ("direction/direction.safetensors", "model/model.safetensors"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name
    shutil.rmtree(runs[0] / "model")  # as if the run had stopped during apply
    resumed = cli("run", recipe, "--out", runs[0])
    assert resumed.exit_code == 0, resumed.output
    assert "direction: up to date, skipped" in resumed.stderr
    assert "model: running" in resumed.stderr
    model = runs[0] / "model" / "model.safetensors"
    assert model.read_bytes() == (runs[1] / "model" / "model.safetensors").read_bytes()


def test_search_stage_edits_with_the_chosen_trial(tmp_path):
    """A recipe with a search stage: the edit is the chosen trial's (the same shards as
    ``orthoedit apply`` with ``chosen/apply.txt``'s arguments), a rerun is all up to date, a
    changed search setting reruns the search (starting over) and the edit after it; a fixed
    direction with a search is refused."""
    import shlex

    text = (
        f"model: {ORGANISM / 'chat'}\n"
        f"measure: {{harmful: {ORGANISM / 'prompts/harmful-train.jsonl'}, "
        f"harmless: {ORGANISM / 'prompts/harmless-train.jsonl'}, layer: 2, position: -1, "
        "refusal_tokens: sorry, n_train: 64, n_val: 6, filter: false}\n"
        "search: {trials: 3, max_new_tokens: 12, startup_trials: 2, max_kl: 0.5}\n"
        "verify: {}\n"
    )
    recipe = _write(tmp_path, text)
    out = tmp_path / "run"
    result = cli("run", recipe, "--out", out)
    assert result.exit_code == 0, result.output
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == ["direction", "search", "model", "verify"]
    assert state["stages"]["verify"]["passed"] is True
    report = json.loads((out / "search" / "pareto.json").read_text())
    assert state["stages"]["search"]["trial"] == report["chosen"]["number"]
    args = shlex.split((out / "search" / "chosen" / "apply.txt").read_text().splitlines()[-1])
    own = tmp_path / "own"
    applied = cli(*args[1 : args.index("--out")], "--out", own)
    assert applied.exit_code == 0, applied.output
    shards = sorted(p.name for p in (out / "model").glob("*.safetensors"))
    assert shards == sorted(p.name for p in own.glob("*.safetensors"))
    for name in shards:
        assert (out / "model" / name).read_bytes() == (own / name).read_bytes(), name

    again = cli("run", recipe, "--out", out)
    assert again.exit_code == 0 and again.stderr.count("up to date, skipped") == 4

    recipe.write_text(text.replace("trials: 3", "trials: 3, seed: 1"))
    changed = cli("run", recipe, "--out", out)
    assert changed.exit_code == 0, changed.output
    assert "search: running" in changed.stderr and "direction: up to date" in changed.stderr
    assert json.loads((out / "search" / "pareto.json").read_text())["settings"]["seed"] == 1

    # confirmed on prompts the unedited model answers (a relative file): it cannot be, so the
    # search stage fails, the later stages still run, and the run exits 1 saying why
    shutil.copyfile(ORGANISM / "prompts/harmless-test.jsonl", tmp_path / "answered.jsonl")
    confirm = "confirm: true, confirm_harmful: answered.jsonl, confirm_n: 4, seed: 1"
    recipe.write_text(text.replace("trials: 3", f"trials: 3, {confirm}"))
    unconfirmed = cli("run", recipe, "--out", out)
    assert unconfirmed.exit_code == 1, unconfirmed.output
    assert "search: trial" in unconfirmed.stderr and "not confirmed on held-out" in (
        unconfirmed.stderr
    )
    state = json.loads((out / "run.json").read_text())
    assert state["stages"]["search"]["confirmed"] is False and "verify" in state["stages"]
    found = json.loads((out / "search" / "pareto.json").read_text())["confirmation"]
    assert found["harmful"] == str(tmp_path / "answered.jsonl")

    fixed = _write(tmp_path, f"model: m\ndirection: {out / 'direction/direction.safetensors'}\n")
    fixed.write_text(fixed.read_text() + "search: {}\n")
    with pytest.raises(BadInputError, match="search needs measure's candidates"):
        stage_configs(*load_recipe(fixed), tmp_path / "o")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_unknown_key_lists_only_keys_a_recipe_may_set(tmp_path, section):
    """The keys an unknown-key error offers are the ones the checker then accepts: none of
    those the run sets itself (model, out, overwrite, revision, ...)."""
    import re

    model, fixed = SECTIONS[section]
    extra = "repo_id: me/m, " if section == "publish" else ""
    text = f"model: m\n{section}: {{{extra}colour: 1}}\n"
    recipe, base = load_recipe(_write(tmp_path, text))
    with pytest.raises(BadInputError) as info:
        stage_configs(recipe, base, tmp_path / "out")
    listed = set(re.search(r"allowed: ([^)]*)\)", str(info.value)).group(1).split(", "))
    assert listed == set(model.model_fields) - fixed
