"""dtype auto: the checkpoint's dtype on a GPU, on a CPU the faster of it and float32 (timed
once per process), logged and recorded; an explicit dtype is used as given."""

from __future__ import annotations

import json

import pytest
import torch

from orthoedit.config import MeasureConfig
from orthoedit.runtime import precision
from orthoedit.runtime.precision import checkpoint_dtype, mlp_shape, resolve_dtype
from orthoedit.runtime.session import load_model


def _timer(half: float, full: float):
    calls = []

    def timer(dtype: str, shape: tuple[int, int]) -> float:
        calls.append((dtype, shape))
        return full if dtype == "float32" else half

    return timer, calls


@pytest.fixture
def bf16_model(tiny_model):
    return tiny_model("qwen2", dtype=torch.bfloat16)


def test_auto_picks_float32_where_bfloat16_is_slower(bf16_model):
    timer, calls = _timer(half=0.089, full=0.015)
    choice = resolve_dtype("auto", bf16_model, None, timer)
    assert choice.dtype == "float32"
    assert choice.note.startswith("dtype auto → float32 (bfloat16 matmul")
    assert "5.9× slower on this CPU" in choice.note
    # timed at the model's own MLP shape, in both dtypes
    assert {d for d, _ in calls} == {"bfloat16", "float32"}
    assert {s for _, s in calls} == {mlp_shape(bf16_model)}


def test_auto_picks_the_checkpoint_dtype_where_it_is_faster(bf16_model):
    timer, _ = _timer(half=0.005, full=0.015)
    choice = resolve_dtype("auto", bf16_model, "cpu", timer)
    assert choice.dtype == "bfloat16"
    assert "3.0× faster than float32" in choice.note


def test_explicit_dtype_and_float32_checkpoints_are_not_timed(bf16_model, tiny_model):
    timer, calls = _timer(half=0.001, full=1.0)
    assert resolve_dtype("float32", bf16_model, None, timer).dtype == "float32"
    assert resolve_dtype("float16", bf16_model, None, timer).dtype == "float16"
    assert checkpoint_dtype(tiny_model("qwen2")) == "float32"
    assert resolve_dtype("auto", tiny_model("qwen2"), None, timer).dtype == "float32"
    assert calls == []


def test_auto_on_a_gpu_is_the_checkpoint_dtype(bf16_model):
    timer, calls = _timer(half=1.0, full=0.001)
    choice = resolve_dtype("auto", bf16_model, "cuda:0", timer)
    assert choice.dtype == "bfloat16" and calls == []


def test_the_measured_timing_is_cached(bf16_model):
    precision.timed_matmul.cache_clear()
    first = resolve_dtype("auto", bf16_model)
    assert first.dtype in ("bfloat16", "float32") and "on this CPU" in first.note
    assert precision.timed_matmul.cache_info().misses == 2
    assert resolve_dtype("auto", bf16_model) == first
    assert precision.timed_matmul.cache_info().misses == 2  # measured once per process


def test_load_model_runs_auto_as_resolved_and_says_so(bf16_model, monkeypatch):
    monkeypatch.setattr(precision, "timed_matmul", lambda d, s, t: 2.0 if d == "bfloat16" else 1.0)
    said: list[str] = []
    model = load_model(bf16_model, "auto", log=said.append)
    assert next(model.parameters()).dtype is torch.float32
    assert said == ["dtype auto → float32 (bfloat16 matmul 32x48 2.0× slower on this CPU)"]
    model = load_model(bf16_model, "bfloat16", log=said.append)
    assert next(model.parameters()).dtype is torch.bfloat16 and len(said) == 1


def test_auto_is_the_default_and_measure_records_the_resolved_dtype(
    bf16_model, tmp_path, monkeypatch
):
    from orthoedit.measure.candidates import measure

    assert MeasureConfig(model="m", out=tmp_path).dtype == "auto"
    monkeypatch.setattr(precision, "timed_matmul", lambda d, s, t: 1.0 if d == "bfloat16" else 2.0)
    said: list[str] = []
    cfg = MeasureConfig(
        model=str(bf16_model), out=tmp_path / "m", layer=1, position=-1, filter=False, n_train=8
    )
    measure(cfg, log=said.append)
    record = json.loads((tmp_path / "m" / "direction.json").read_text())
    assert record["dtype"] == "bfloat16"
    assert any(line.startswith("dtype auto → bfloat16") for line in said)
