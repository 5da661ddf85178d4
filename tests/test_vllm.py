"""``--backend vllm`` for ``eval safety`` and ``compare``, on CPU: vLLM itself needs NVIDIA
GPUs, so a stand-in ``vllm`` module (and a stand-in ``ray``) that answers like vLLM, from the
organism under transformers, one prompt at a time, stands in for it. What is checked is
orthoedit's side: the arguments each engine is given, the token rows in and the token ids
out, the stop tokens, the word-salad score read from prompt log-probabilities, the prompts
dealt to data-parallel replicas and put back in order, and the fallback to transformers where
vLLM is not installed. The answers equal the transformers backend's, record for record."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from transformers import AutoModelForCausalLM

from orthoedit.config import CompareConfig, EvalBenchConfig
from orthoedit.organism import CHAT_MODEL
from orthoedit.runtime import vllm_engine
from test_cli import cli, one_line_error, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)

SAFETY = ["--harmful", "organism", "--harmless", "organism", "--n", "6", "--max-new-tokens", "24"]


class FakeLLM:
    """``vllm.LLM`` as far as orthoedit uses it: greedy answers (stopping after a stop
    token, as vLLM does) and prompt log-probabilities, from the model under transformers."""

    made: ClassVar[list[dict]] = []
    instances: ClassVar[list] = []
    models: ClassVar[dict] = {}

    def __init__(self, **kwargs):
        FakeLLM.made.append(kwargs)
        FakeLLM.instances.append(self)
        self.rows_seen: list[list[int]] = []
        key = (kwargs["model"], kwargs["dtype"])
        if key not in FakeLLM.models:
            dtype = getattr(torch, kwargs["dtype"])
            FakeLLM.models[key] = AutoModelForCausalLM.from_pretrained(key[0], dtype=dtype).eval()
        self.model = FakeLLM.models[key]

    @torch.no_grad()
    def _one(self, ids: list[int], params):
        self.rows_seen.append(ids)
        x = torch.tensor([ids])
        if params.prompt_logprobs is not None:
            logprobs = torch.log_softmax(self.model(x).logits[0].float(), -1)
            prompt = [None] + [
                {t: SimpleNamespace(logprob=float(logprobs[k, t]))} for k, t in enumerate(ids[1:])
            ]
            return SimpleNamespace(prompt_logprobs=prompt, outputs=[SimpleNamespace(token_ids=[0])])
        made = self.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=params.max_tokens,
            do_sample=False,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=list(params.stop_token_ids),
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        stop = next((k + 1 for k, t in enumerate(made) if t in params.stop_token_ids), len(made))
        return SimpleNamespace(
            prompt_logprobs=None, outputs=[SimpleNamespace(token_ids=made[:stop])]
        )

    def generate(self, prompts, params, use_tqdm=True):
        return [self._one(p["prompt_token_ids"], params) for p in prompts]


class FakeSamplingParams:
    def __init__(self, prompt_logprobs=None, repetition_penalty=1.0, stop_token_ids=(), **kw):
        self.prompt_logprobs, self.repetition_penalty = prompt_logprobs, repetition_penalty
        self.stop_token_ids = list(stop_token_ids)
        self.__dict__.update(kw)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class FakeRay:
    """``ray.remote`` actors run in this process; records what each replica was given."""

    def __init__(self):
        self.replicas: list = []
        self.gpus: list[int] = []
        self.killed: list = []

    def module(self) -> types.ModuleType:
        def remote(num_gpus=None):
            def wrap(cls):
                def start(*args):
                    self.gpus.append(num_gpus)
                    replica = cls(*args)
                    self.replicas.append(replica)
                    calls = {"generate": SimpleNamespace(remote=replica.generate)}
                    return SimpleNamespace(**calls)

                return SimpleNamespace(remote=start)

            return wrap

        return _module("ray", remote=remote, get=list, kill=self.killed.append)


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.made, FakeLLM.instances = [], []
    monkeypatch.setitem(
        sys.modules, "vllm", _module("vllm", LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    )
    return FakeLLM


def _args_made(folder, **over) -> dict:
    args = {
        "model": str(folder),
        "tokenizer": str(folder),
        "dtype": "float32",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
    }
    return args | over


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]


def test_eval_safety_and_compare_answer_as_with_transformers(fake_vllm, tmp_path):
    """Same answers, verdicts and word-salad scores as the transformers backend; every engine
    is given the model's folder, the dtype, the tensor parallel size and the memory share."""
    base = ["eval", "safety", CHAT_MODEL, "--base", CHAT_MODEL, *SAFETY]
    hf = cli(*base, "--out", tmp_path / "hf")
    assert hf.exit_code == 0, hf.output
    assert fake_vllm.made == []
    vllm = cli(
        *base, "--out", tmp_path / "vllm", "--backend", "vllm", "--gpu-memory-utilization", "0.5"
    )
    assert vllm.exit_code == 0, vllm.output
    assert fake_vllm.made == [_args_made(CHAT_MODEL, gpu_memory_utilization=0.5)] * 2
    ours, theirs = _records(tmp_path / "hf"), _records(tmp_path / "vllm")
    assert [(r["completion"], r["verdict"]) for r in ours] == [
        (r["completion"], r["verdict"]) for r in theirs
    ]
    scored = [(a["surprisal"], b["surprisal"]) for a, b in zip(ours, theirs, strict=True)]
    assert any(a for a, _ in scored), "some complied answers were scored"
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in scored if a is not None)
    settings = json.loads((tmp_path / "vllm" / "report.json").read_text())["settings"]
    assert settings["backend"] == "vllm" and settings["data_parallel_size"] == 1

    compared = {}
    for backend in ("hf", "vllm"):
        report = tmp_path / f"{backend}.md"
        args = ["compare", CHAT_MODEL, CHAT_MODEL, "--prompts", "organism", "--n", "6"]
        result = cli(*args, "--report", report, "--backend", backend, "--max-new-tokens", "24")
        assert result.exit_code == 0, result.output
        compared[backend] = report.read_text()
    assert compared["hf"] == compared["vllm"]
    assert "(refused)" in compared["hf"] and "(complied)" in compared["hf"]


def test_data_parallel_replicas_share_the_prompts(fake_vllm, monkeypatch, tmp_path):
    """--data-parallel-size 3: three Ray replicas per model, each on --tensor-parallel-size
    GPUs, each given every third prompt; the answers come back in the prompts' order (the same
    report as with one engine) and the replicas are stopped when the model is done."""
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray.module())
    args = [
        "compare",
        CHAT_MODEL,
        CHAT_MODEL,
        "--prompts",
        "organism",
        "--n",
        "7",
        "--backend",
        "vllm",
    ]
    one = cli(*args, "--report", tmp_path / "one.md", "--max-new-tokens", "16")
    assert one.exit_code == 0, one.output
    fake_vllm.made = []
    three = cli(
        *args, "--report", tmp_path / "three.md", "--max-new-tokens", "16",
        "--data-parallel-size", "3", "--tensor-parallel-size", "2",
    )  # fmt: skip
    assert three.exit_code == 0, three.output
    assert (tmp_path / "three.md").read_text() == (tmp_path / "one.md").read_text()
    assert fake_vllm.made == [_args_made(CHAT_MODEL, tensor_parallel_size=2)] * 6
    assert ray.gpus == [2] * 6 and len(ray.killed) == 6
    single = fake_vllm.instances[0].rows_seen  # the base model's engine in the first run
    assert len(single) == 7
    for k, replica in enumerate(ray.replicas[:3]):  # the base model's replicas
        assert replica.llm.rows_seen == single[k::3]


def test_without_vllm_the_command_says_so_and_uses_transformers(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_engine, "available", lambda: False)
    args = ["compare", CHAT_MODEL, CHAT_MODEL, "--prompts", "organism", "--n", "4"]
    hf = cli(*args, "--report", tmp_path / "hf.md", "--max-new-tokens", "12")
    fell = cli(
        *args, "--report", tmp_path / "fell.md", "--max-new-tokens", "12",
        "--backend", "vllm", "--tensor-parallel-size", "2",
    )  # fmt: skip
    assert hf.exit_code == 0 and fell.exit_code == 0, fell.output
    assert "--backend vllm: vLLM is not installed" in fell.output
    assert "generating with transformers instead" in fell.output
    assert (tmp_path / "fell.md").read_text() == (tmp_path / "hf.md").read_text()
    out = tmp_path / "safety"
    safety = cli("eval", "safety", CHAT_MODEL, *SAFETY, "--out", out, "--backend", "vllm")
    assert safety.exit_code == 0, safety.output
    assert json.loads((out / "report.json").read_text())["settings"]["backend"] == "hf"
    # eval bench too: lm-eval is handed its hf backend
    from orthoedit.evaluate.bench import model_spec

    cfg = EvalBenchConfig(base="a", edited="b", out=tmp_path / "b", backend="vllm")
    lines: list[str] = []
    fallen = vllm_engine.resolved(cfg, lines.append)
    assert model_spec(fallen, "a")[0] == "hf" and "vLLM is not installed" in lines[0]


def test_options_that_do_not_go_together(fake_vllm, monkeypatch, tmp_path):
    report = tmp_path / "c.md"
    args = ["compare", CHAT_MODEL, CHAT_MODEL, "--report", report]
    line = one_line_error(cli(*args, "--tensor-parallel-size", "2"))
    assert "add --backend vllm" in line
    line = one_line_error(cli(*args, "--data-parallel-size", "2"))
    assert "add --backend vllm" in line
    spread = ["--backend", "vllm", "--device", "auto", "--max-memory", "0=1GiB"]
    assert "vLLM places its own" in one_line_error(cli(*args, *spread))
    real = vllm_engine.find_spec
    monkeypatch.setattr(vllm_engine, "find_spec", lambda n: None if n == "ray" else real(n))
    line = one_line_error(cli(*args, "--backend", "vllm", "--data-parallel-size", "2"))
    assert "pip install ray" in line
    assert not report.exists() and fake_vllm.made == []
    with pytest.raises(ValueError, match="add --backend vllm"):
        CompareConfig(base="a", edited="b", data_parallel_size=2)


def test_search_confirmation_generates_with_vllm(fake_vllm, organism_measured, tmp_path):
    """search --confirm --backend vllm: one engine on the temporary checkpoint of the chosen
    edit, one on the unedited model, and the same answers as the transformers confirmation;
    --max-memory places the trials' model and is not refused beside --backend vllm."""
    model = json.loads((organism_measured / "direction.json").read_text())["model"]
    out = tmp_path / "s"
    args = ["search", model, "--candidates", organism_measured, "--out", out, "--trials", "1"]
    args += ["--n", "4", "--max-new-tokens", "8", "--max-kl", "0.3", "--confirm"]
    args += ["--confirm-harmful", "organism"]
    args += ["--confirm-harmless", "organism", "--confirm-n", "4", "--confirm-max-new-tokens", "12"]
    hf = cli(*args)
    assert hf.exit_code == 0, hf.output
    ours = _records(out / "confirm")
    spread = ["--device", "auto", "--max-memory", "cpu=8GiB"]
    vllm = cli(*args, "--backend", "vllm", "--tensor-parallel-size", "2", *spread)
    assert vllm.exit_code == 0, vllm.output
    staged = out / ".confirm-model"
    assert fake_vllm.made == [
        _args_made(staged, tensor_parallel_size=2),
        _args_made(model, tensor_parallel_size=2),
    ]
    assert not staged.exists()
    theirs = _records(out / "confirm")
    keys = ("model", "kind", "prompt", "completion", "verdict")
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in theirs]
    found = json.loads((out / "pareto.json").read_text())["confirmation"]
    assert found["backend"] == "vllm" and found["confirmed"]
