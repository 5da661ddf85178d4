"""``orthoedit push`` and the recipe's publish stage: file selection, the card with evaluation
results, license naming, dry runs without network, and uploads through the real
huggingface_hub client against a local Hub stand-in (tests/hubstub.py), including an upload
that breaks off and is run again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

import hubstub
from conftest import folder_digest
from hubstub import FAKE_TOKEN, is_lfs_put
from orthoedit.config import ApplyConfig, PushConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.card import EVAL_BEGIN, EVAL_END
from orthoedit.errors import BadInputError
from orthoedit.model.checkpoint import INDEX_NAME
from orthoedit.publish import plan_push
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

hub = hubstub.hub  # the fixture
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "acme/tiny-llama-orthoedit"


@pytest.fixture(scope="module")
def edited(tiny_model, direction_file, tmp_path_factory) -> Path:
    """An edited tiny llama in several shards (read-only for tests)."""
    out = tmp_path_factory.mktemp("push") / "edited"
    apply(ApplyConfig(model=str(tiny_model("llama")), direction=direction_file, out=out))
    return out


def _front(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def _expected(plan) -> dict[str, bytes]:
    return {
        i.path_in_repo: i.data if i.data is not None else i.local.read_bytes() for i in plan.items
    }


# --- without network: selection, card, dry run -----------------------------------------------


def test_plan_selects_the_checkpoint_and_moves_the_direction(edited):
    plan = plan_push(PushConfig(model_dir=edited, repo_id=REPO))
    paths = [i.path_in_repo for i in plan.items]
    weights = set(json.loads((edited / INDEX_NAME).read_text())["weight_map"].values())
    top = {p for p in paths if "/" not in p and p.endswith(".safetensors")}
    assert top == weights and len(weights) >= 2  # only the weights, every shard
    assert "orthoedit/direction.safetensors" in paths
    for name in ("config.json", "plan.json", "README.md", INDEX_NAME, "tokenizer.json"):
        assert name in paths
    assert plan.method == "commit" and plan.revision == "main"
    # no evaluation given: the card is apply's card, placeholder included
    assert plan.card == (edited / "README.md").read_text()


def test_older_layout_direction_goes_to_the_subfolder(edited, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(edited, old)
    (old / "orthoedit" / "direction.safetensors").rename(old / "direction.safetensors")
    paths = [i.path_in_repo for i in plan_push(PushConfig(model_dir=old, repo_id=REPO)).items]
    assert "direction.safetensors" not in paths and "orthoedit/direction.safetensors" in paths


def test_card_carries_the_evaluation(organism_run):
    plan = plan_push(PushConfig(model_dir=organism_run / "model", repo_id=REPO, eval=organism_run))
    card = plan.card
    safety = json.loads((organism_run / "eval/safety/report.json").read_text())["summary"]
    bench = json.loads((organism_run / "eval/bench/report.json").read_text())
    verify = json.loads((organism_run / "verify.json").read_text())

    def pct(role, kind, key):
        return f"{safety[role][kind]['overall'][key]:.1%}"

    assert (
        f"| harmful requests refused | {pct('base', 'harmful', 'refusal')} | "
        f"{pct('model', 'harmful', 'refusal')} |" in card
    )
    assert (
        f"| harmful answers the judge calls unsafe | {pct('base', 'harmful', 'unsafe')} | "
        f"{pct('model', 'harmful', 'unsafe')} |" in card
    )
    (row,) = bench["rows"]
    assert f"| {row['task']} | {row['metric']} | {row['base']:.4g} | {row['edited']:.4g} |" in card
    assert f"max |Δlogit| {verify['max_logit_diff']:.4g}" in card and "; passed." in card
    assert "NOT_EVALUATED" not in card and card.count(EVAL_BEGIN) == card.count(EVAL_END) == 1
    assert "orthoedit push --eval" not in card  # the placeholder is gone
    assert _front(card) == _front((organism_run / "model" / "README.md").read_text())
    paths = {i.path_in_repo for i in plan.items}
    assert {
        "orthoedit/eval/bench/report.md",
        "orthoedit/eval/safety/report.json",
        "orthoedit/verify.json",
    } <= paths
    # the model's answers to harmful requests are never published
    assert not any("completions" in p or p == "orthoedit/eval/safety/report.md" for p in paths)
    # the eval/ folder itself works as --eval too
    again = plan_push(
        PushConfig(model_dir=organism_run / "model", repo_id=REPO, eval=organism_run / "eval")
    )
    assert again.card == card


def test_dry_run_prints_files_and_card_and_sends_nothing(hub, organism_run):
    before = folder_digest(organism_run)
    result = cli(
        "push", organism_run / "model", REPO, "--eval", organism_run, "--dry-run", "--private"
    )
    assert result.exit_code == 0, result.output
    assert "orthoedit/direction.safetensors" in result.stdout
    assert "orthoedit/eval/bench/report.png" in result.stdout
    assert "| harmful requests refused |" in result.stdout  # the card, with the evaluation
    assert hub.requests == []  # no network at all
    assert folder_digest(organism_run) == before


def _licensed_model(src: Path, direction_file, out: Path, license_yaml: str) -> Path:
    (src / "README.md").write_text(f"---\n{license_yaml}\n---\n# source\n")
    apply(ApplyConfig(model=str(src), direction=direction_file, out=out))
    return out


def test_license_naming_rule(model_copy, direction_file, tmp_path):
    src = model_copy("llama")
    model = _licensed_model(src, direction_file, tmp_path / "l", "license: llama3.2")
    bad = cli("push", model, "me/tiny-abliterated", "--dry-run")
    assert bad.exit_code == 2
    assert "begin with “Llama”" in bad.stderr and "--ignore-license-name" in bad.stderr
    assert cli("push", model, "me/Llama-3.2-tiny-orthoedit", "--dry-run").exit_code == 0
    forced = cli("push", model, "me/tiny-abliterated", "--dry-run", "--ignore-license-name")
    assert forced.exit_code == 0 and "warning" in forced.stderr
    # no naming rule under Apache-2.0
    other = _licensed_model(src, direction_file, tmp_path / "a", "license: apache-2.0")
    assert cli("push", other, "me/tiny-abliterated", "--dry-run").exit_code == 0


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-plan", "no plan.json"),
        ("stray-weights", "not one of the checkpoint's weight files"),
        ("missing-shard", "is missing"),
        ("bad-repo", "not a Hub repo id"),
        ("no-namespace", "OWNER/NAME"),
        ("empty-eval", "no eval/bench"),
    ],
)
def test_bad_inputs(case, needle, edited, tmp_path, hub):
    model = tmp_path / "model"
    shutil.copytree(edited, model)
    repo, extra = REPO, []
    if case == "no-plan":
        (model / "plan.json").unlink()
    elif case == "stray-weights":
        shutil.copyfile(model / "orthoedit" / "direction.safetensors", model / "extra.safetensors")
    elif case == "missing-shard":
        next(model.glob("model-*.safetensors")).unlink()
    elif case == "bad-repo":
        repo = "acme/bad name!"
    elif case == "no-namespace":
        repo = "tiny-llama"
    elif case == "empty-eval":
        (tmp_path / "empty").mkdir()
        extra = ["--eval", tmp_path / "empty"]
    before = folder_digest(model)
    result = cli("push", model, repo, *extra)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert hub.requests == []  # refused before any network access
    assert folder_digest(model) == before


# --- uploads to the local Hub stand-in -------------------------------------------------------


def test_push_uploads_exactly_the_plan_and_loads_back(hub, organism_run, tmp_path):
    model = organism_run / "model"
    before = folder_digest(organism_run)
    result = cli("push", model, REPO, "--eval", organism_run, "--private")
    assert result.exit_code == 0, result.output
    plan = plan_push(PushConfig(model_dir=model, repo_id=REPO, eval=organism_run))
    assert hub.files(REPO) == _expected(plan)
    assert hub.repos[REPO].private
    assert [c for c in hub.repos[REPO].commits if c.branch == "main"][-1].summary.startswith(
        "orthoedit: upload"
    )
    assert not hub.unexpected and not hub.errors
    assert folder_digest(organism_run) == before  # nothing written locally
    # What a user downloads loads with plain transformers and computes what the local copy does.
    local = snapshot_download(REPO, cache_dir=tmp_path / "dl")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(ids).logits
            for p in (local, model)
        ]
    assert torch.equal(*logits)


def test_push_to_a_branch_leaves_main_alone(hub, edited):
    result = cli("push", edited, REPO, "--revision", "orthoedit-v1")
    assert result.exit_code == 0, result.output
    assert hub.files(REPO, "main") == {}
    plan = plan_push(PushConfig(model_dir=edited, repo_id=REPO))
    assert hub.files(REPO, "orthoedit-v1") == _expected(plan)


def test_upload_that_breaks_off_commits_nothing_and_a_rerun_resumes(hub, edited):
    plan = plan_push(PushConfig(model_dir=edited, repo_id=REPO))
    lfs = [i for i in plan.items if i.path_in_repo.endswith(".safetensors")]
    assert len(lfs) >= 3
    # Every LFS upload after the first fails, through all of the client's own retries.
    hub.fail(is_lfs_put, times=None, skip=1)
    broken = cli("push", edited, REPO)
    assert broken.exit_code == 1, broken.output
    assert (
        "nothing was committed" in broken.stderr and "Run the same command again" in broken.stderr
    )
    assert hub.files(REPO) == {}  # the commit is atomic: the branch is untouched
    held = set(hub.lfs)
    assert len(held) >= 1  # one object made it before the failure
    hub.clear_failures()
    again = cli("push", edited, REPO)
    assert again.exit_code == 0, again.output
    assert hub.files(REPO) == _expected(plan)
    # Objects the Hub already held were not sent again: one successful PUT per object.
    for oid in hub.lfs:
        assert len([r for r in hub.lfs_puts(oid) if r.status == 200]) == 1, oid
    assert len(hub.lfs) == len({i.local.read_bytes() for i in lfs})


def test_repush_replaces_the_weights_as_a_set(hub, edited, tiny_model, direction_file, tmp_path):
    assert cli("push", edited, REPO).exit_code == 0
    single = tmp_path / "single"
    src = tiny_model("llama", max_shard_size="1GB")  # the same model in one file
    apply(ApplyConfig(model=str(src), direction=direction_file, out=single))
    result = cli("push", single, REPO)
    assert result.exit_code == 0, result.output
    assert "deleted stale model-" in result.stderr
    plan = plan_push(PushConfig(model_dir=single, repo_id=REPO))
    assert hub.files(REPO) == _expected(plan)  # the old shards and index are gone


def test_large_method(hub, edited):
    # a staging folder left by an earlier, broken-off try, with a file this push does not have
    stage = edited.parent / f".{edited.name}.push-staging"
    (stage / "old").mkdir(parents=True)
    (stage / "old" / "stale.bin").write_bytes(b"stale")
    before = folder_digest(edited)
    result = cli("push", edited, REPO, "--method", "large")
    assert result.exit_code == 0, result.output
    plan = plan_push(PushConfig(model_dir=edited, repo_id=REPO))
    assert hub.files(REPO) == _expected(plan)  # the stale file did not go up
    assert not stage.exists() and folder_digest(edited) == before


def test_token_is_never_printed_or_written(hub, edited, tmp_path, monkeypatch):
    ok = cli("push", edited, REPO)
    assert ok.exit_code == 0
    assert all(a in (f"Bearer {FAKE_TOKEN}", None) for a in hub.authorizations)
    assert f"Bearer {FAKE_TOKEN}" in hub.authorizations  # it was sent, to the Hub only
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN0000000000000000000000")
    wrong = cli("push", edited, REPO)
    assert wrong.exit_code == 2 and "refused the token" in wrong.stderr
    monkeypatch.delenv("HF_TOKEN")
    missing = cli("push", edited, REPO)
    assert missing.exit_code == 2 and "no Hugging Face token" in missing.stderr
    for result in (ok, wrong, missing):
        assert FAKE_TOKEN not in result.output and "wrongTOKEN" not in result.output
    home = Path(__import__("os").environ["HF_HOME"])
    for folder in (edited.parent, home):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            assert FAKE_TOKEN.encode() not in data and b"wrongTOKEN" not in data, path


# --- the recipe's publish stage ----------------------------------------------------------------


def _recipe(tmp_path, model: Path, direction: Path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {model}\ndirection: {direction}\nverify: {{}}\n"
        f"publish: {{repo_id: {REPO}, private: true}}\n"
    )
    return path


def test_recipe_publishes_after_checks_and_skips_when_up_to_date(
    hub, tiny_model, direction_file, tmp_path
):
    recipe, out = _recipe(tmp_path, tiny_model("llama"), direction_file), tmp_path / "run"
    first = cli("run", recipe, "--out", out)
    assert first.exit_code == 0, first.output
    record = json.loads((out / "publish.json").read_text())
    assert record["repo_id"] == REPO and record["commit"]
    plan = plan_push(PushConfig(model_dir=out / "model", repo_id=REPO, eval=out))
    assert hub.files(REPO) == _expected(plan)  # verify.json went along and into the card
    assert "### Exactness" in hub.files(REPO)["README.md"].decode()
    commits = len(hub.repos[REPO].commits)
    again = cli("run", recipe, "--out", out)
    assert again.exit_code == 0 and "publish: up to date, skipped" in again.stderr
    assert len(hub.repos[REPO].commits) == commits


def test_recipe_does_not_publish_a_failed_check(
    hub, tiny_model, direction_file, tmp_path, monkeypatch
):
    import orthoedit.verify

    real = orthoedit.verify.verify

    def failing(cfg, log=print):
        report = real(cfg, log=log)
        report.failures.append("max |Δlogit| too large (injected)")
        return report

    monkeypatch.setattr(orthoedit.verify, "verify", failing)
    recipe, out = _recipe(tmp_path, tiny_model("llama"), direction_file), tmp_path / "run"
    result = cli("run", recipe, "--out", out)
    assert result.exit_code == 1
    assert "publish: not run, since verify" in result.stderr
    assert hub.requests == [] and not (out / "publish.json").exists()
    # rerunning does not publish either: the failed check is still on record
    monkeypatch.setattr(orthoedit.verify, "verify", real)
    again = cli("run", recipe, "--out", out)
    assert again.exit_code == 1 and "publish: not run" in again.stderr
    assert hub.requests == []


# --- GGUF files of export gguf ------------------------------------------------------------------


@pytest.fixture
def exported(edited, tmp_path, monkeypatch) -> Path:
    """A copy of the edited checkpoint with an F16 and a BF16 GGUF in its gguf/ folder (the
    stand-in converter of tests/fake_llama_cpp)."""
    from orthoedit.config import ExportGgufConfig
    from orthoedit.export import llama_cpp
    from orthoedit.export.gguf import export_gguf

    monkeypatch.setattr(llama_cpp, "installed", lambda name: True)
    model = tmp_path / "exported"
    shutil.copytree(edited, model)
    fake = Path(__file__).resolve().parent / "fake_llama_cpp"
    cfg = ExportGgufConfig(model_dir=model, types=["F16", "BF16"], llama_cpp=fake, name="tiny")
    export_gguf(cfg, log=lambda m: None)
    return model


def test_plan_takes_the_gguf_files_and_the_card_lists_their_types(exported):
    plan = plan_push(PushConfig(model_dir=exported, repo_id=REPO))
    paths = [i.path_in_repo for i in plan.items]
    gguf = [p for p in paths if p.startswith("gguf/")]
    assert gguf == ["gguf/export.json", "gguf/tiny-BF16.gguf", "gguf/tiny-F16.gguf"]  # no marker
    card = plan.card
    section = card[card.index("## GGUF files") : card.index("## License")]
    for name, kind in (("tiny-F16.gguf", "F16"), ("tiny-BF16.gguf", "BF16")):
        size = (exported / "gguf" / name).stat().st_size
        assert f"| [gguf/{name}](gguf/{name}) | {kind} | {size / 1e6:.1f} MB |" in section
    assert "local llama.cpp" in section  # the record's converter, not a local path
    assert plan.card.replace(section, "") == (exported / "README.md").read_text()


def test_gguf_from_another_folder(exported, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (exported / "gguf").rename(elsewhere)
    plan = plan_push(PushConfig(model_dir=exported, repo_id=REPO, gguf=elsewhere))
    assert "gguf/tiny-F16.gguf" in [i.path_in_repo for i in plan.items]
    shutil.copytree(elsewhere, exported / "gguf")
    with pytest.raises(BadInputError, match="holds GGUF files too"):
        plan_push(PushConfig(model_dir=exported, repo_id=REPO, gguf=elsewhere))
    for path in (exported / "gguf").glob("*.gguf"):
        path.unlink()
    with pytest.raises(BadInputError, match=r"holds no \.gguf files"):
        plan_push(PushConfig(model_dir=exported, repo_id=REPO))
    (exported / "gguf" / "x.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(BadInputError, match="not a readable GGUF"):
        plan_push(PushConfig(model_dir=exported, repo_id=REPO))


def test_push_uploads_the_gguf_files_and_a_repush_without_them_deletes_them(hub, exported):
    result = cli("push", exported, REPO)
    assert result.exit_code == 0, result.output
    plan = plan_push(PushConfig(model_dir=exported, repo_id=REPO))
    assert hub.files(REPO) == _expected(plan)
    assert "## GGUF files" in hub.files(REPO)["README.md"].decode()
    shutil.rmtree(exported / "gguf")
    again = cli("push", exported, REPO)
    assert again.exit_code == 0, again.output
    assert "deleted stale gguf/tiny-F16.gguf" in again.stderr
    assert not [p for p in hub.files(REPO) if p.startswith("gguf/")]
