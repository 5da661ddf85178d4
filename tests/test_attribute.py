"""``orthoedit attribute``: per-head slicing on every family (grouped-query attention, output
biases, Conv1D), the gradient against finite differences, and the organism end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orthoedit.organism import CHAT_MODEL
from orthoedit.prompts import load_prompt_file
from orthoedit.research.attribute import every_writer
from orthoedit.research.components import _capture, mean_log_odds, writers_of
from orthoedit.runtime.hooks import plan_hooks
from orthoedit.runtime.scores import first_token_logprobs, log_odds
from orthoedit.runtime.session import chat_ids, pad_id, post_instruction_ids
from test_cli import cli, wide_consoles  # noqa: F401  (the CLI runner and its wide consoles)
from tiny import FAMILIES

CASES = [(f, {}) for f in FAMILIES] + [("llama", {"bias": True})]


def _setup(folder, direction_file):
    _, table, checkpoint, _, plan = every_writer(folder, direction_file)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, writers_of(model, table, plan, checkpoint)


def _outputs(model, writers, ids):
    """Components (via attribute's hooks) and the writers' real outputs at the last position."""
    real = {}
    handles = [
        model.get_submodule(w.module).register_forward_hook(
            lambda _m, _a, out, name=w.module: real.__setitem__(name, out[:, -1].detach())
        )
        for w in writers
        if w.kind == "attn"
    ]
    try:
        with torch.no_grad(), _capture(model, writers, probes=False) as seen:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return dict(seen), real


def _v_rows(model, layer: int, kv_head: int, head_dim: int, n_heads: int, n_kv: int):
    """The weight slice that only kv head ``kv_head``'s values depend on, per family."""
    gpt2 = hasattr(model, "transformer")
    attn = model.get_submodule(
        f"transformer.h.{layer}.attn" if gpt2 else f"model.layers.{layer}.self_attn"
    )
    if hasattr(attn, "v_proj"):
        return attn.v_proj.weight, (0, slice(kv_head * head_dim, (kv_head + 1) * head_dim))
    if hasattr(attn, "qkv_proj"):  # phi3: rows q | k | v
        start = (n_heads + n_kv + kv_head) * head_dim
        return attn.qkv_proj.weight, (0, slice(start, start + head_dim))
    d = attn.c_attn.weight.shape[0]  # gpt2 Conv1D [d, 3d]: columns q | k | v
    start = 2 * d + kv_head * head_dim
    return attn.c_attn.weight, (1, slice(start, start + head_dim))


@pytest.mark.parametrize(
    ("family", "kwargs"), CASES, ids=[f"{f}{'-bias' * bool(k)}" for f, k in CASES]
)
def test_heads_partition_the_output_and_follow_the_value_groups(
    family, kwargs, tiny_model, direction_file
):
    folder = tiny_model(family, **kwargs)
    model, writers = _setup(folder, direction_file)
    attn = [w for w in writers if w.kind == "attn"]
    assert len(attn) == model.config.num_hidden_layers
    config = model.config
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    seen, real = _outputs(model, writers, ids)
    for w in attn:
        assert (
            w.n_heads == n_heads and len([c for c in w.components if c.kind == "head"]) == n_heads
        )
        assert w.has_bias == (model.get_submodule(w.module).bias is not None)
        if kwargs.get("bias") or family == "gpt2":
            assert w.has_bias  # a separate component, so heads stay pure
        # heads (+ bias) add up to the writer's output
        torch.testing.assert_close(seen[w.module].sum(1), real[w.module], atol=1e-5, rtol=1e-5)
    # Change the values of one kv head: exactly the query heads that read it change.
    layer, kv_head = 1, n_kv - 1
    w = attn[layer]
    weight, (axis, rows) = _v_rows(model, layer, kv_head, w.head_dim, n_heads, n_kv)
    with torch.no_grad():
        noise = torch.randn_like(weight.select(axis, 0)).unsqueeze(axis) * 0.5
        index = [slice(None), slice(None)]
        index[axis] = rows
        weight[tuple(index)] += noise
    after, _ = _outputs(model, writers, ids)
    changed = (after[w.module] - seen[w.module]).abs().amax(dim=(0, 2)) > 1e-6
    group = n_heads // n_kv
    expected = [kv_head * group <= h < (kv_head + 1) * group for h in range(n_heads)]
    assert changed[:n_heads].tolist() == expected
    if w.has_bias:
        assert not changed[n_heads]


@pytest.fixture(scope="module")
def organism_attribution(organism_run, tmp_path_factory):
    """attribute on the organism through the CLI, on the very prompts and refusal tokens
    measure scored; the shifts and the loaded model are kept for the finite-difference test."""
    from orthoedit.research import attribute as A

    direction = organism_run / "direction"
    out = tmp_path_factory.mktemp("attribute") / "attr"
    captured: dict = {}
    real_shifts, real_mean = A._shifts_for, A.mean_log_odds

    def spy_shifts(components, deltas):
        captured["deltas"] = deltas
        return real_shifts(components, deltas)

    def spy_mean(model, rows, token_ids, batch_size, pad, shifts=None):
        captured.update(model=model, rows=rows, token_ids=token_ids, pad=pad)
        return real_mean(model, rows, token_ids, batch_size, pad, shifts)

    A._shifts_for, A.mean_log_odds = spy_shifts, spy_mean
    try:
        run = cli(
            "attribute",
            CHAT_MODEL,
            "--direction",
            direction / "direction.safetensors",
            "--out",
            out,
            "--harmful",
            direction / "val-harmful.jsonl",
            "--harmless",
            direction / "val-harmless.jsonl",
        )
    finally:
        A._shifts_for, A.mean_log_odds = real_shifts, real_mean
    assert run.exit_code == 0, run.output
    return out, json.loads((direction / "scores.json").read_text()), captured


def test_organism_agrees_with_measure(organism_attribution, organism_run):
    out, scores, _ = organism_attribution
    record = json.loads((out / "attribution.json").read_text())
    chosen = scores["chosen"]
    # same prompts, same first tokens of measure's refusal openings: the unpatched and the
    # fully ablated log-odds are the first-token log-odds of those tokens, with and without
    # the edit measure scored (its bypass reads whole openings, so it is lower than these)
    assert record["settings"]["refusal_tokens"] == scores["refusal_tokens"]
    folder = organism_run / "direction"
    _, _, checkpoint, _, plan = every_writer(CHAT_MODEL, folder / "direction.safetensors")
    model = AutoModelForCausalLM.from_pretrained(CHAT_MODEL, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(CHAT_MODEL)
    prompts = [i["prompt"] for i in load_prompt_file(folder / "val-harmful.jsonl")]
    rows = chat_ids(tok, prompts, post_instruction_ids(tok), None)
    ids = tok.convert_tokens_to_ids(scores["refusal_tokens"])
    base = log_odds(first_token_logprobs(model, rows, 8, pad_id(tok)), ids).mean()
    with plan_hooks(model, plan, checkpoint):
        ablated = log_odds(first_token_logprobs(model, rows, 8, pad_id(tok)), ids).mean()
    assert record["baseline_log_odds"] == pytest.approx(float(base), abs=1e-4)
    assert record["ablated_log_odds"] == pytest.approx(float(ablated), abs=1e-4)
    assert chosen["bypass"] <= float(ablated) + 1e-4
    for name in ("attribution.md", "cumulative.png", "heads.png"):
        assert (out / name).stat().st_size > 1000, name
    md = (out / "attribution.md").read_text()
    assert "Estimates vs real patching" in md
    checked = [c for c in record["components"] if c["patched"] is not None]
    assert len(checked) == 10


def test_organism_estimates_against_real_patching(organism_attribution):
    """On measure's validation prompts the organism's refusal saturates: the gradient at the
    harmful activations misses layer 0's MLP, whose real effect is the second largest. The
    integrated estimate ranks the components as real patching does, with the same signs;
    its sizes are not within 20% for the heads (they interact), which the report states."""
    out, _, _ = organism_attribution
    components = json.loads((out / "attribution.json").read_text())["components"]
    checked = [c for c in components if c["patched"] is not None]
    by_estimate = sorted(checked, key=lambda c: -abs(c["estimate"]))
    by_patch = sorted(checked, key=lambda c: -abs(c["patched"]))
    assert [c["name"] for c in by_estimate[:5]] == [c["name"] for c in by_patch[:5]]
    for c in by_patch[:5]:
        assert c["estimate"] * c["patched"] > 0, c["name"]
    first = sorted(components, key=lambda c: -abs(c["first_order"]))
    assert by_patch[1]["name"] not in [c["name"] for c in first[:5]]  # what first order misses


def test_integrated_estimates_add_up_to_the_joint_patch(organism_attribution):
    """Completeness of integrated gradients: the estimates of all components sum to the
    effect of patching all of them at once (up to the midpoint rule's error)."""
    from orthoedit.research.components import _shifts_for

    out, _, captured = organism_attribution
    record = json.loads((out / "attribution.json").read_text())
    names = [c["name"] for c in record["components"]]
    every = [
        type("C", (), {"name": c["name"], "module": c["module"]}) for c in record["components"]
    ]
    joint = mean_log_odds(
        captured["model"],
        captured["rows"],
        captured["token_ids"],
        16,
        captured["pad"],
        _shifts_for(every, {n: captured["deltas"][n] for n in names}),
    )
    total = sum(c["estimate"] for c in record["components"])
    assert total == pytest.approx(joint - record["baseline_log_odds"], rel=0.1)
    # the report's completeness check is this comparison, made by attribute itself
    whole = record["checks"]["completeness"]
    assert whole["patched_together"] == pytest.approx(joint - record["baseline_log_odds"], abs=1e-6)
    assert whole["sum_of_estimates"] == pytest.approx(total, abs=1e-9)
    assert whole["passed"] == (whole["relative_error"] <= 0.1)


def test_the_ranking_check_is_the_rank_correlation_over_the_largest_patched(
    organism_attribution,
):
    """The ranking check: Spearman between estimate and patched effect over the components
    with the largest patched effects (here the 10 patched, chosen by their estimates, which
    the report says), computed again here from the record."""
    out, _, _ = organism_attribution
    record = json.loads((out / "attribution.json").read_text())
    rank = record["checks"]["ranking"]
    patched = [c for c in record["components"] if c["patched"] is not None]
    top = sorted(patched, key=lambda c: -abs(c["patched"]))[:20]
    order = lambda xs: np.argsort(np.argsort(xs))  # noqa: E731  (no ties among these floats)
    expected = np.corrcoef(order([c["estimate"] for c in top]), order([c["patched"] for c in top]))
    assert rank["components"] == len(top) == 10
    assert rank["spearman"] == pytest.approx(float(expected[0, 1]), abs=1e-12)
    assert rank["passed"] == (rank["spearman"] >= 0.8)
    assert "among the 10 largest estimates" in rank["chosen_by"]
    md = (out / "attribution.md").read_text()
    assert "## Checks" in md and f"{rank['spearman']:.3f}" in md


def test_spearman():
    from orthoedit.research.attribute import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_patch_all_patches_every_component(organism_run, tmp_path):
    """--patch-all: every component is patched alone, and the ranking check says it chose its
    components by their patched effect alone."""
    direction = organism_run / "direction"
    out = tmp_path / "attr"
    args = ["attribute", CHAT_MODEL, "--direction", direction / "direction.safetensors"]
    args += ["--harmful", direction / "val-harmful.jsonl", "--harmless"]
    args += [direction / "val-harmless.jsonl", "--steps", "1", "--patch-all", "--out", out]
    run = cli(*args)
    assert run.exit_code == 0, run.output
    record = json.loads((out / "attribution.json").read_text())
    assert all(c["patched"] is not None for c in record["components"])
    assert record["checks"]["ranking"]["chosen_by"] == "patched effect, every component patched"
    assert record["checks"]["ranking"]["components"] == min(20, len(record["components"]))


def test_gradient_matches_finite_differences(organism_attribution):
    """first order = d/dε of the log-odds with ε·Δ patched, at ε = 0 (central differences)."""
    out, _, captured = organism_attribution
    record = json.loads((out / "attribution.json").read_text())
    eps = 1e-2
    top = sorted(record["components"], key=lambda c: -abs(c["first_order"]))[:5]
    for c in top:
        sides = [
            mean_log_odds(
                captured["model"],
                captured["rows"],
                captured["token_ids"],
                16,
                captured["pad"],
                {c["module"]: captured["deltas"][c["name"]] * sign * eps},
            )
            for sign in (1, -1)
        ]
        slope = (sides[0] - sides[1]) / (2 * eps)
        assert slope == pytest.approx(c["first_order"], rel=0.01), c["name"]


def test_bad_inputs(tmp_path, tiny_model, direction_file):

    wrong = cli("attribute", CHAT_MODEL, "--direction", direction_file, "--out", tmp_path / "o")
    assert wrong.exit_code == 2 and "direction" in wrong.stderr
    assert not (tmp_path / "o").exists()
    (tmp_path / "one.txt").write_text("only one prompt\n")
    few = cli(
        "attribute", tiny_model("llama"), "--direction", direction_file, "--out", tmp_path / "o",
        "--harmful", tmp_path / "one.txt", "--refusal-tokens", "a",
    )  # fmt: skip
    assert few.exit_code == 2 and "at least 2" in few.stderr
    assert not (tmp_path / "o").exists()


def test_a_16_bit_report_says_its_rounding_blurs_the_linearity_check():
    """Patched in bfloat16 (or float16), the linearity line says that rounding can be as large
    as the small effects it compares, and how to check; in float32, or with no component in
    the linear regime, it does not."""
    from orthoedit.report.attribution import _checks

    found = {
        "ranking": {"components": 3, "chosen_by": "x", "spearman": 0.9, "minimum": 0.8},
        "completeness": {"sum_of_estimates": 1.0, "patched_together": 1.0},
        "linearity": {
            "fraction_of_gap": 0.1,
            "saturation_gap": 8.0,
            "components": ["L3.mlp"],
            "median_estimate_over_patched": 0.11,
            "median_abs_error": 0.89,
        },
    }
    found["ranking"]["passed"] = found["completeness"]["passed"] = True
    found["completeness"] |= {"relative_error": 0.0, "maximum": 0.1}
    said = {dtype: "\n".join(_checks(found, dtype)) for dtype in ("float32", "bfloat16", "float16")}
    for dtype in ("bfloat16", "float16"):
        assert f"Patched in {dtype}: its rounding can be as large as" in said[dtype]
        assert "--dtype float32" in said[dtype]
    assert "rounding" not in said["float32"]
    found["linearity"] |= {"components": [], "median_estimate_over_patched": None}
    found["linearity"]["median_abs_error"] = None
    assert "rounding" not in "\n".join(_checks(found, "bfloat16"))
