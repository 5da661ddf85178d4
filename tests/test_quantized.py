"""Quantized checkpoints stay quantized: FP8 block-scaled weights and gpt-oss's MXFP4 experts are
dequantized, projected and requantized in their own format; everything else is copied byte for
byte; verify compares with the plan's hooks on the dequantized source within the format's
tolerance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from orthoedit.cli import app
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit import feedback
from orthoedit.edit.apply import apply
from orthoedit.edit.plan import Plan
from orthoedit.errors import UnsupportedModelError
from orthoedit.model import quant
from orthoedit.model.checkpoint import INDEX_NAME, Checkpoint
from orthoedit.model.direction import save_direction
from orthoedit.runtime.hooks import plan_hooks
from orthoedit.runtime.rounding import rounded_again
from orthoedit.runtime.session import load_model, load_tokenizer
from orthoedit.verify import MEASURED_MULTIPLE, quant_tolerance, verify
from orthoedit.verify_logits import DEFAULT_PROMPTS, encode_prompts
from quantize import (
    GPT_OSS_MXFP4,
    fp8_dequantize,
    fp8_quantize,
    is_mxfp4_expert,
    mxfp4_dequantize,
    mxfp4_quantize,
    quantize_fp8,
    quantize_mxfp4,
)
from test_bad_inputs import edit_config, expect_bad, outdir, shard_of  # noqa: F401

BLOCK = (8, 16)
FP8 = quant.quant_format(
    {"quantization_config": {"quant_method": "fp8", "weight_block_size": BLOCK}}
)
MXFP4 = quant.quant_format({"quantization_config": {"quant_method": "mxfp4"}})
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 120, 140, 7]])


@pytest.fixture(scope="module")
def fp8_edit(tiny_model, direction_file, tmp_path_factory):
    """(float32 original, its FP8 copy, the FP8 copy edited)."""
    root = tmp_path_factory.mktemp("fp8")
    original = tiny_model("qwen3")
    source = quantize_fp8(original, root / "fp8", BLOCK)
    apply(ApplyConfig(model=str(source), direction=direction_file, out=root / "edited"))
    return original, source, root / "edited"


def test_unedited_bytes_and_config_unchanged(fp8_edit):
    _, source, edited = fp8_edit
    quantized = _bytes_and_config_unchanged(source, edited)
    assert set(quantized) >= {O_PROJ, "model.layers.1.mlp.down_proj.weight"}


def _bytes_and_config_unchanged(source: Path, edited: Path) -> list[str]:
    """Every tensor but the planned ones and their scales byte-identical, shard headers and
    config.json's quantization_config unchanged; returns the planned quantized tensors."""
    plan = Plan.load(edited)
    quantized = [op for op in plan.ops if op.scales]
    a, b = Checkpoint.open(source), Checkpoint.open(edited)
    scales = {op.scales for op in quantized}
    for name, info in a.tensors.items():
        other = b.tensors[name]
        assert (other.dtype, other.shape) == (info.dtype, info.shape)
        same = bytes(a.shard(info).bytes(info)) == bytes(b.shard(other).bytes(other))
        if name not in scales:  # rewritten, but a block keeps its scale while its values fit
            assert same == (name not in plan.edited), name
    for f in a.files:
        assert (edited / f.path.name).read_bytes()[: f.data_start] == f.path.read_bytes()[
            : f.data_start
        ]
    config = json.loads((edited / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((source / "config.json").read_text())["quantization_config"]
    )
    return [op.tensor for op in quantized]


def test_edited_weights_within_format_rounding(fp8_edit):
    """‖uᵀW'‖/‖W'‖ of the dequantized edited weights is within ε, and no larger than twice the
    component along u that the format's own rounding leaves in the unedited weights."""
    original, _, edited = fp8_edit
    r = Plan.load(edited).r
    u = torch.from_numpy(r / np.linalg.norm(r)).float()
    weights, sources = load_file_all(edited), load_file_all(original)
    worst = own = 0.0
    for op in Plan.load(edited).ops:
        if not op.scales:
            continue
        w = fp8_dequantize(weights[op.tensor], weights[op.scales], BLOCK)
        worst = max(worst, float((u @ w).norm() / w.norm()))
        w32 = sources[op.tensor]
        rounded = fp8_dequantize(*fp8_quantize(w32, BLOCK), BLOCK)
        own = max(own, float((u @ (rounded - w32)).norm() / w32.norm()))
    assert worst <= FP8.epsilon
    assert worst <= 2 * own, (worst, own)


def load_file_all(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(p).items()}


@torch.no_grad()
def test_logits_match_hooks_on_dequantized_source(fp8_edit):
    """The edited checkpoint (loaded by transformers, dequantized) against the plan's hooks on
    the dequantized source: within the format's tolerance, and of the size of the logit change
    the format's own rounding of the same writers makes in the float model."""
    original, source, edited = fp8_edit
    plan = Plan.load(edited)
    ref_model = load_model(source)
    with plan_hooks(ref_model, plan, Checkpoint.open(source, FP8)):
        ref = ref_model(input_ids=IDS).logits
    out = load_model(edited)(input_ids=IDS).logits
    err = float((out - ref).abs().max())
    tol = quant_tolerance(FP8).max_logit_diff * max(1.0, float(ref.abs().max()))

    model = load_model(original)
    base = model(input_ids=IDS).logits
    for op in plan.ops:
        if op.scales:  # the same writers, rounded once by the format
            param = model.get_parameter(op.tensor)
            param.copy_(fp8_dequantize(*fp8_quantize(param, BLOCK), BLOCK))
    own = float((model(input_ids=IDS).logits - base).abs().max())
    print(f"edited vs hooks {err:.3g}, own rounding {own:.3g}, tolerance {tol:.3g}")
    assert err <= tol
    assert own <= tol
    assert err <= 2 * own


@torch.no_grad()
def test_rounded_again_in_place_and_put_back(fp8_edit):
    """Inside ``rounded_again`` each planned FP8 weight moves by at most one rounding (ε of
    itself, a little more at the bottom of the range); on exit it is the source's again."""
    _, source, edited = fp8_edit
    plan, model = Plan.load(edited), load_model(source)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with rounded_again(model, plan, Checkpoint.open(source, FP8), 2.0**0.5) as missing:
        assert not missing
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == {op.tensor for op in plan.ops if op.scales}
        for name in moved:
            p, w = model.get_parameter(name), before[name]
            assert float((p - w).abs().max()) <= 2 * FP8.epsilon * float(w.abs().max())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_verify_passes_and_catches_tampering(fp8_edit, tmp_path):
    _, source, edited = fp8_edit
    report = verify(VerifyConfig(source=str(source), edited=edited), log=lambda _: None)
    assert report.storage_dtype == "FP8" and report.passed, report.failures
    assert report.max_rounding_ratio is not None and report.max_rounding_ratio < 1
    result = CliRunner().invoke(app, ["verify", str(source), str(edited)])
    assert result.exit_code == 0, result.output

    tampered = tmp_path / "tampered"
    shutil.copytree(edited, tampered)
    # the unedited weight, with its own (unedited) scales
    _put_back(source, tampered, [O_PROJ, O_PROJ + "_scale_inv"])
    assert Checkpoint.open(source).tensors[O_PROJ].dtype == "F8_E4M3"
    report = verify(VerifyConfig(source=str(source), edited=tampered), log=lambda _: None)
    assert not report.passed and report.worst_tensor == O_PROJ
    assert report.max_rounding_ratio > quant_tolerance(FP8).rounding_multiple
    result = CliRunner().invoke(app, ["verify", str(source), str(tampered)])
    assert result.exit_code == 1


#: Families whose tiny FP8 instances (every decoder Linear in 8×8 blocks) verify checks
#: against the measured rounding: dense, mixture of experts (fused in the model, one tensor per
#: expert on disk), hybrid linear attention.
MEASURED = ["llama", "deepseek_v3", "qwen3_5", "glm4_moe"]


@pytest.fixture(scope="module", params=MEASURED)
def fp8_family(request, tiny_model, direction_file, tmp_path_factory):
    """(float32 original, its FP8 copy, the copy edited, verify's report on it)."""
    root = tmp_path_factory.mktemp(f"fp8-{request.param}")
    original = tiny_model(request.param)
    source = quantize_fp8(original, root / "fp8", (8, 8))
    edited = root / "edited"
    apply(ApplyConfig(model=str(source), direction=direction_file, out=edited, tied="untie"))
    report = verify(VerifyConfig(source=str(source), edited=edited), log=lambda _: None)
    return original, source, edited, report


def test_verify_judges_logits_against_the_measured_rounding(fp8_family):
    """E (edited vs hooks) within MEASURED_MULTIPLE × R (one fresh rounding of the planned
    weights, measured), R above the ε bound it replaces; the source model is put back."""
    *_, report = fp8_family
    e, r = report.max_logit_diff, report.rounding_max_logit_diff
    print(f"E {e:.3g} R {r:.3g} KL {report.mean_kl:.3g} R's KL {report.rounding_mean_kl:.3g}")
    assert report.passed, report.failures
    assert 0 < e <= MEASURED_MULTIPLE * r
    assert report.mean_kl <= MEASURED_MULTIPLE**2 * report.rounding_mean_kl
    floor = quant_tolerance(FP8).max_logit_diff * max(1.0, report.max_abs_logit)
    assert report.max_logit_bound == max(floor, MEASURED_MULTIPLE * r)


def test_measured_tolerance_catches_a_wrong_edit(fp8_family, direction_file, tmp_path):
    """Not vacuous: the checkpoint edited along another direction (with the right plan.json),
    or with every quantized tensor left unedited, fails on its logits, not just its weights."""
    _, source, edited, _ = fp8_family
    other = tmp_path / "other.safetensors"
    save_direction(other, torch.randn(32, generator=torch.Generator().manual_seed(99)), {})
    wrong = tmp_path / "wrong"
    apply(ApplyConfig(model=str(source), direction=other, out=wrong, tied="untie"))
    shutil.copy(edited / "plan.json", wrong / "plan.json")
    unedited = tmp_path / "unedited"
    shutil.copytree(edited, unedited)
    quantized = [n for op in Plan.load(edited).ops if op.scales for n in (op.tensor, op.scales)]
    _put_back(source, unedited, quantized)
    for folder in (wrong, unedited):
        report = verify(VerifyConfig(source=str(source), edited=folder), log=lambda _: None)
        print(folder.name, report.failures[:2])
        assert any(f.startswith(("max |Δlogit|", "mean KL")) for f in report.failures)


def _put_back(source: Path, folder: Path, names: list[str]) -> None:
    """Tensors of ``folder`` overwritten in place with the source's bytes."""
    src, out = Checkpoint.open(source), Checkpoint.open(folder)
    for name in names:
        a, b = src.tensors[name], out.tensors[name]
        with open(b.file, "r+b") as f:
            f.seek(b.start)
            f.write(bytes(src.shard(a).bytes(a)))


@torch.no_grad()
def test_edit_error_of_the_size_of_quantizing_the_float_model(fp8_family):
    """E against Q, the logit change that quantizing the float model to FP8 made in the first
    place (both unedited, verify's prompts): the format's own rounding of the unedited weights.
    Both are one draw of a rounding's effect: E is within MEASURED_MULTIPLE × Q, and its mean
    KL within Q's."""
    original, source, _, report = fp8_family
    diff, kl = _quantizing_effect(original, source)
    print(f"E {report.max_logit_diff:.3g} KL {report.mean_kl:.3g}; Q {diff:.3g} KL {kl:.3g}")
    assert report.max_logit_diff <= MEASURED_MULTIPLE * diff
    assert report.mean_kl <= kl


@torch.no_grad()
def _quantizing_effect(original: Path, source: Path) -> tuple[float, float]:
    """Q: (max |Δlogit|, mean KL) between the float model and its quantized copy, both
    loaded in float32, on verify's prompts."""
    inputs = encode_prompts(load_tokenizer(source), DEFAULT_PROMPTS)
    before, after = load_model(original), load_model(source)
    diff, kls = 0.0, []
    for ids in inputs:
        a, b = before(input_ids=ids).logits[0].double(), after(input_ids=ids).logits[0].double()
        diff = max(diff, float((a - b).abs().max()))
        kls.append((a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1))
    return diff, float(torch.cat(kls).mean())


def _fp8_copy(tiny_model, tmp_path: Path) -> Path:
    return quantize_fp8(tiny_model("qwen3"), tmp_path / "src", BLOCK)


def _rewrite(folder: Path, change, tensor: str = O_PROJ) -> None:
    """Apply ``change(tensors, index)`` to the shard holding ``tensor``."""
    shard = shard_of(folder, tensor)
    tensors = load_file(shard)
    index = json.loads((folder / INDEX_NAME).read_text())
    change(tensors, index["weight_map"])
    save_file(tensors, str(shard), {"format": "pt"})
    (folder / INDEX_NAME).write_text(json.dumps(index))


def test_missing_scales_refused(tiny_model, direction_file, tmp_path, outdir):  # noqa: F811
    src = _fp8_copy(tiny_model, tmp_path)

    def drop(tensors, weight_map):
        del tensors[O_PROJ + "_scale_inv"], weight_map[O_PROJ + "_scale_inv"]

    _rewrite(src, drop)
    needles = [O_PROJ, "scale", "missing"]
    expect_bad(src, direction_file, outdir, needles, UnsupportedModelError, library={})


def test_wrong_scale_shape_refused(tiny_model, direction_file, tmp_path, outdir):  # noqa: F811
    src = _fp8_copy(tiny_model, tmp_path)

    def reshape(tensors, weight_map):
        tensors[O_PROJ + "_scale_inv"] = torch.ones(2, 2)

    _rewrite(src, reshape)
    needles = [O_PROJ, "_scale_inv", "shape", "[4, 3]"]
    expect_bad(src, direction_file, outdir, needles, UnsupportedModelError, library={})


@pytest.mark.parametrize(
    "config",
    [
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
        {"quant_method": "fp8", "weight_block_size": [8, 16], "scale_fmt": "ue8m0"},
        {"quant_method": "compressed-tensors", "format": "float-quantized"},
    ],
    ids=["fp8-per-tensor", "fp8-ue8m0", "compressed-tensors"],
)
def test_other_quantization_refused(config, tiny_model, direction_file, tmp_path, outdir):  # noqa: F811
    src = _fp8_copy(tiny_model, tmp_path)
    edit_config(src, quantization_config=config)
    needles = ["quantized", config["quant_method"], "dequantize", "unquantized"]
    expect_bad(src, direction_file, outdir, needles, UnsupportedModelError, library={})


def test_fp8_codec_matches_transformers():
    """orthoedit's numpy codec against the test's torch one (transformers' Fp8Quantize):
    the same scales and bytes up to one float32 ulp (amax/448 against 1/(448/amax)), and a
    round trip within the format's rounding."""
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(3))
    q, s = fp8_quantize(w, BLOCK)
    mine_q, mine_s = quant.encode(FP8, w.numpy(), "F32")
    assert np.allclose(mine_s.view(np.float32), s.numpy(), rtol=1e-6, atol=0)
    assert np.mean(mine_q == q.view(torch.uint8).numpy()) > 0.99
    values, scales = quant.decode(FP8, mine_q, mine_s, 48, "F32")
    assert np.all(np.abs(values - w.numpy()) <= FP8.rounding_bound(values, scales) * 1.0001)


def test_mxfp4_codec_matches_transformers():
    """MXFP4: encoding gives the bytes of the test's encoder (triton_kernels' rounding: scale
    amax/6 rounded up to a power of two, elements to nearest, ties away from zero), ties, a
    block of zeros and a subnormal block included; decoding equals transformers' dequantization
    of gpt-oss blocks; the round trip stays within the format's rounding bound."""
    w = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4))
    w[0, 0, :32] = 0.0
    w[0, 1, :32] = torch.tensor([0.25, -0.75, 1.25, -1.75, 2.5, -3.5, 5.0, 6.0] * 4)  # ties
    w[0, 2, :32] *= 1e-40
    blocks, exps = mxfp4_quantize(w)
    packed, mine = quant.encode(MXFP4, w.reshape(32, 64).numpy(), "U8")
    assert np.array_equal(packed, blocks.reshape(32, 32).numpy())
    assert np.array_equal(mine, exps.reshape(32, 2).numpy())
    theirs = mxfp4_dequantize(blocks, exps)  # [experts, cols, rows]
    values, scales = quant.decode(MXFP4, packed, mine, 64, "U8")
    assert np.array_equal(theirs.transpose(1, 2).reshape(32, 64).numpy(), values)
    assert np.all(
        np.abs(values - w.reshape(32, 64).numpy()) <= MXFP4.rounding_bound(values, scales)
    )


# --- MXFP4: gpt-oss's experts, as the released checkpoints store them ----------------------

DOWN = "model.layers.0.mlp.experts.down_proj"


@pytest.fixture(scope="module")
def mxfp4_edit(tiny_model, direction_file, tmp_path_factory):
    """(BF16 gpt-oss with experts 64 wide, its MXFP4 copy, the copy edited, verify's report)."""
    root = tmp_path_factory.mktemp("mxfp4")
    original = tiny_model("gpt_oss", dtype=torch.bfloat16, intermediate=64)
    source = quantize_mxfp4(original, root / "mxfp4")
    edited = root / "edited"
    apply(ApplyConfig(model=str(source), direction=direction_file, out=edited))
    report = verify(VerifyConfig(source=str(source), edited=edited), log=lambda _: None)
    return original, source, edited, report


@torch.no_grad()
def test_mxfp4_checkpoint_and_edit_load_in_transformers(mxfp4_edit):
    """The tiny checkpoint is laid out as the released gpt-oss ones (config, several shards,
    experts in ``_blocks``/``_scales``, everything else BF16); transformers loads it and the
    edit with no key missing or unexpected, dequantized on the CPU, the experts within one
    rounding of the float model's and every other tensor equal to it; both run."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    original, source, edited, _ = mxfp4_edit
    config = json.loads((source / "config.json").read_text())
    assert config["quantization_config"] == GPT_OSS_MXFP4
    stored = Checkpoint.open(source)
    assert len(stored.files) > 1
    for name, info in stored.tensors.items():
        assert info.dtype == ("U8" if name.endswith(("_blocks", "_scales")) else "BF16"), name
    floats, planned = load_file_all(original), Plan.load(edited).edited
    for folder in (source, edited):
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32,
            output_loading_info=True,
        )  # fmt: skip
        assert not any(info.values()), info
        stored = load_file_all(folder)
        for name, param in model.named_parameters():
            w = floats[name].float()
            if is_mxfp4_expert(name):  # the stored bytes, as transformers decodes them
                assert torch.equal(param, mxfp4_dequantize(stored[name + "_blocks"],
                                                           stored[name + "_scales"]))  # fmt: skip
                if folder == source:  # within one rounding: ε of the largest element
                    assert float((param - w).abs().max()) <= 0.25 * float(w.abs().max()), name
            elif folder == source or name not in planned:
                assert torch.equal(param, w), name
        assert model.generate(IDS, max_new_tokens=4, do_sample=False).shape == (1, 14)


def test_mxfp4_unedited_bytes_and_config_unchanged(mxfp4_edit):
    """Only the experts' down projections are requantized (with their scales); gate_up (a
    reader), the router, attention and norms are copied byte for byte."""
    _, source, edited, _ = mxfp4_edit
    quantized = _bytes_and_config_unchanged(source, edited)
    assert quantized == [f"model.layers.{i}.mlp.experts.down_proj_blocks" for i in (0, 1)]
    assert {op.scales for op in Plan.load(edited).ops if op.scales} == {
        f"model.layers.{i}.mlp.experts.down_proj_scales" for i in (0, 1)
    }


def test_mxfp4_edited_experts_within_format_rounding(mxfp4_edit):
    """‖W'u‖/‖W'‖ of the dequantized edited experts (transformers' decoding) is within ε = 2⁻²,
    and no larger than twice the component along u that MXFP4's own rounding of the float
    experts leaves."""
    original, _, edited, _ = mxfp4_edit
    r = Plan.load(edited).r
    u = torch.from_numpy(r / np.linalg.norm(r)).float()
    weights, sources = load_file_all(edited), load_file_all(original)
    worst = own = 0.0
    for op in Plan.load(edited).ops:
        if op.scales:
            w = mxfp4_dequantize(weights[op.tensor], weights[op.scales])  # [experts, in, d]
            worst = max(worst, float((w @ u).norm() / w.norm()))
            w32 = sources[op.tensor.removesuffix("_blocks")].float()
            rounded = mxfp4_dequantize(*mxfp4_quantize(w32.transpose(1, 2)))
            own = max(own, float(((rounded - w32) @ u).norm() / w32.norm()))
    print(f"edited ‖W'u‖/‖W'‖ {worst:.3g}, the format's own rounding {own:.3g}")
    assert worst <= MXFP4.epsilon
    assert worst <= 2 * own


def test_mxfp4_verify_judges_logits_against_the_measured_rounding(mxfp4_edit):
    """verify passes: E within 2R (R measured on the shifted grids, the experts found in the
    loaded model), KL within 4× R's, every expert's requantization error along u within its
    rounding bound, the BF16 writers held to BF16's tolerance; the CLI agrees."""
    _, source, edited, report = mxfp4_edit
    e, r = report.max_logit_diff, report.rounding_max_logit_diff
    print(f"E {e:.3g} R {r:.3g} KL {report.mean_kl:.3g} R's KL {report.rounding_mean_kl:.3g} "
          f"ratio {report.max_rounding_ratio:.3g}")  # fmt: skip
    assert report.storage_dtype == "MXFP4" and report.passed, report.failures
    assert 0 < e <= MEASURED_MULTIPLE * r
    assert report.mean_kl <= MEASURED_MULTIPLE**2 * report.rounding_mean_kl
    assert report.max_logit_bound == max(0.5 * max(1.0, report.max_abs_logit), 2 * r)
    assert report.max_rounding_ratio < 1
    assert report.tolerance["float_weight_residual"] == 4e-3  # BF16's, not ε
    assert report.max_float_weight_residual <= 4e-3
    result = CliRunner().invoke(app, ["verify", str(source), str(edited)])
    assert result.exit_code == 0, result.output


def test_mxfp4_edit_error_of_the_size_of_quantizing_the_float_model(mxfp4_edit):
    """E against Q, the change quantizing the BF16 model's experts to MXFP4 made: E within 2Q,
    its mean KL within Q's."""
    original, source, _, report = mxfp4_edit
    diff, kl = _quantizing_effect(original, source)
    print(f"E {report.max_logit_diff:.3g} KL {report.mean_kl:.3g}; Q {diff:.3g} KL {kl:.3g}")
    assert report.max_logit_diff <= MEASURED_MULTIPLE * diff
    assert report.mean_kl <= kl


def _put_back_expert(source: Path, folder: Path, names: list[str], expert: int) -> None:
    """One expert's bytes of fused tensors of ``folder`` overwritten with the source's."""
    src, out = Checkpoint.open(source), Checkpoint.open(folder)
    for name in names:
        a, b = src.tensors[name], out.tensors[name]
        size = a.nbytes // a.shape[0]
        with open(b.file, "r+b") as f:
            f.seek(b.start + expert * size)
            f.write(bytes(src.shard(a).bytes(a))[expert * size : (expert + 1) * size])


@pytest.mark.parametrize("expert", [0, 3])
def test_mxfp4_verify_catches_one_expert_left_unedited(mxfp4_edit, expert, tmp_path):
    """Negative control: one expert of one layer as it was (blocks and scales), the three others
    edited: the logits cannot show it on this tiny model (R is of the size of its largest
    logit), the weight check does, expert by expert (ratio about 1/ε = 4 against 2)."""
    _, source, edited, _ = mxfp4_edit
    tampered = tmp_path / "tampered"
    shutil.copytree(edited, tampered)
    _put_back_expert(source, tampered, [DOWN + "_blocks", DOWN + "_scales"], expert)
    report = verify(VerifyConfig(source=str(source), edited=tampered), log=lambda _: None)
    print(report.failures)
    assert report.rounding_worst_tensor == DOWN + "_blocks"
    assert report.max_rounding_ratio > 3
    assert [f for f in report.failures if "rounding bound" in f]
    result = CliRunner().invoke(app, ["verify", str(source), str(tampered)])
    assert result.exit_code == 1


def test_mxfp4_verify_catches_a_bf16_writer_left_unedited(mxfp4_edit, tmp_path):
    """The attention output (BF16 in an MXFP4 checkpoint) left unedited fails on BF16's weight
    tolerance; MXFP4's ε (0.25) would have passed it (‖uᵀW‖/‖W‖ ≈ 0.17)."""
    _, source, edited, _ = mxfp4_edit
    tampered = tmp_path / "tampered"
    shutil.copytree(edited, tampered)
    _put_back(source, tampered, [O_PROJ])
    report = verify(VerifyConfig(source=str(source), edited=tampered), log=lambda _: None)
    assert report.float_worst_tensor == O_PROJ
    assert 4e-3 < report.max_float_weight_residual < MXFP4.epsilon
    assert any("stored in float" in f for f in report.failures)


def test_mxfp4_measured_tolerance_catches_a_wrong_direction(mxfp4_edit, tmp_path):
    """Not vacuous on the logits: the checkpoint edited along another direction (with the
    right plan.json) fails on its mean KL, though its max |Δlogit| stays within 2R."""
    _, source, edited, _ = mxfp4_edit
    other = tmp_path / "other.safetensors"
    save_direction(other, torch.randn(32, generator=torch.Generator().manual_seed(99)), {})
    wrong = tmp_path / "wrong"
    apply(ApplyConfig(model=str(source), direction=other, out=wrong))
    shutil.copy(edited / "plan.json", wrong / "plan.json")
    report = verify(VerifyConfig(source=str(source), edited=wrong), log=lambda _: None)
    print(report.failures)
    assert any(f.startswith("mean KL") for f in report.failures)


@pytest.mark.parametrize("bad", ["shape", "missing"])
def test_mxfp4_wrong_or_missing_scales_refused(bad, tiny_model, direction_file, tmp_path, outdir):  # noqa: F811
    """MXFP4 blocks whose scales do not match them: one line naming both, exit 2, nothing
    written."""
    original = tiny_model("gpt_oss", dtype=torch.bfloat16, intermediate=64)
    src = quantize_mxfp4(original, tmp_path / "src")
    scales = DOWN + "_scales"

    def change(tensors, weight_map):
        if bad == "shape":
            tensors[scales] = torch.full((4, 32, 1), 127, dtype=torch.uint8)
        else:
            del tensors[scales], weight_map[scales]

    _rewrite(src, change, scales)
    needles = [DOWN + "_blocks", scales, "[4, 32, 2]" if bad == "shape" else "missing"]
    expect_bad(src, direction_file, outdir, needles, UnsupportedModelError, library={})


# --- At a width where nearest rounding undoes the edit --------------------------------------

WIDE = 1024


@pytest.fixture(scope="module")
def mxfp4_wide(tiny_model, tmp_path_factory):
    """(MXFP4 gpt-oss, d_model 1024, one layer of four experts 64 wide; the copy edited along a
    random direction; verify's report on it)."""
    root = tmp_path_factory.mktemp("mxfp4-wide")
    original = tiny_model("gpt_oss", dtype=torch.bfloat16, intermediate=64, hidden=WIDE, n_layers=1)
    source = quantize_mxfp4(original, root / "mxfp4")
    direction = root / "direction.safetensors"
    save_direction(direction, torch.randn(WIDE, generator=torch.Generator().manual_seed(7)), {})
    edited = root / "edited"
    apply(ApplyConfig(model=str(source), direction=direction, out=edited))
    report = verify(VerifyConfig(source=str(source), edited=edited), log=lambda _: None)
    return source, edited, report


def test_mxfp4_edit_holds_where_nearest_rounding_undoes_it(mxfp4_wide):
    """At d_model 1024 the projection moves each element by about 1/32 of itself, less than a
    grid step: requantizing PW to nearest leaves most of the component along u (and fails
    verify's weight check). The feedback leaves no more than a bfloat16 edit would
    (2⁻⁹‖W‖) or a tenth of it, and verify passes."""
    source, edited, report = mxfp4_wide
    plan = Plan.load(edited)
    u = torch.from_numpy(plan.r / np.linalg.norm(plan.r)).float()
    before, after = load_file_all(source), load_file_all(edited)
    for op in plan.ops:
        if not op.scales:
            continue
        w = mxfp4_dequantize(before[op.tensor], before[op.scales])  # [experts, in, d_model]
        pw = w - (w @ u)[..., None] * u
        nearest = torch.stack([_nearest_mxfp4(e) for e in pw])
        edit = mxfp4_dequantize(after[op.tensor], after[op.scales])
        full, plain, left = (float((x @ u).norm()) for x in (w, nearest, edit))
        floor = feedback.FLOOR * float(w.norm())
        print(f"{op.tensor}: left {left / full:.3g} (nearest {plain / full:.3g}, floor "
              f"{floor / full:.3g})")  # fmt: skip
        assert plain > 0.4 * full
        assert left <= max(floor, 0.1 * full)
    print(f"ratio {report.max_rounding_ratio:.3g}, E {report.max_logit_diff:.3g} R "
          f"{report.rounding_max_logit_diff:.3g}")  # fmt: skip
    assert report.passed, report.failures
    assert report.max_rounding_ratio < 1


def _nearest_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """One expert ``[in, d_model]`` requantized to nearest with fresh scales, dequantized."""
    values = quant.decode(MXFP4, *quant.encode(MXFP4, w.T.numpy(), "U8"), w.shape[0], "U8")[0]
    return torch.from_numpy(values).T
