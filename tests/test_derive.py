"""Derived tables (issue 35, point 2): a family without a shipped table has its residual
writers read off a tiny instance of its class and proved exact there (model/derive.py).

For families that do ship a table, the derived one must plan exactly the same tensors, axes
and norms (gains and their offsets) on the tiny checkpoint, and apply + verify must pass with
it; a family with no table is edited end to end through the CLI, its card saying derived; a
name that is no transformers class, and a block whose writer cannot be classified, are one
line and exit 2 with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import orthoedit.model.architectures as architectures
import orthoedit.model.derive as derive
from orthoedit.config import ApplyConfig, VerifyConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.plan import build_plan
from orthoedit.errors import UnsupportedModelError
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.model.direction import load_directions
from orthoedit.model.source import read_config
from orthoedit.verify import verify
from test_cli import (
    cli,
    flat,
    one_line_error,
    wide_consoles,  # noqa: F401 (a fixture)
)
from tiny import _reinit, build_tokenizer

#: Tabled families whose derived table must plan what the shipped one plans: pre-norm, experts
#: (a tensor per expert on disk), post-norm x · (1 + w) and x · w, a hybrid with two token
#: mixers, a chain of two norms with fused experts and per-layer inputs, GPT-2's Conv1D and
#: learned positions, gpt-oss's [experts, in, d_model] with biases, Nemotron-H's one mixer per
#: block, DeepSeek V3's latent attention (whose kv heads must not shrink: put back).
TABLED = ("llama", "qwen3_moe", "gemma3", "olmo2", "qwen3_5", "gemma4_text_moe", "gpt2", "gpt_oss",
          "nemotron_h", "deepseek_v3")  # fmt: skip


def _ops(plan) -> set:
    return {
        (op.tensor, op.site, op.layer, op.axis, op.norm, op.norm_offset,
         tuple((n.tensor, n.offset) for n in op.outer_norms))
        for op in plan.ops
    }  # fmt: skip


def _plan(table, src, direction_file):
    config = read_config(src)
    d_model, n_layers, _ = table.dims(config)
    found = load_directions([direction_file], d_model, n_layers, None, False)
    return build_plan(
        table=table, checkpoint=Checkpoint.open(src), config=config, direction=found,
        source=str(src), tied_policy="untie",
    )  # fmt: skip


@pytest.fixture
def untabled(monkeypatch):
    """``untabled(family)``: the shipped tables without that one, as if it were not there."""

    def drop(family: str) -> None:
        kept = {k: v for k, v in architectures.load_tables().items() if k != family}
        monkeypatch.setattr(architectures, "load_tables", lambda: kept)
        monkeypatch.setattr(derive, "load_tables", lambda: kept)
        derive._DERIVED.clear()

    yield drop
    derive._DERIVED.clear()


@pytest.mark.parametrize("family", TABLED)
def test_derived_table_plans_what_the_shipped_one_plans(tiny_model, direction_file, family):
    src = tiny_model(family)
    config = read_config(src)
    shipped = architectures.table_for_config(config)
    derived = derive.derive_table(config)
    assert derived.derived and not shipped.derived
    assert _ops(_plan(derived, src, direction_file)) == _ops(_plan(shipped, src, direction_file))
    assert derived.blocks.module == shipped.blocks.module
    assert derived.blocks.final_norm == shipped.blocks.final_norm


@pytest.mark.parametrize("family", ["gemma3", "qwen3_moe"])
def test_apply_and_verify_pass_with_a_derived_table(
    tiny_model, direction_file, tmp_path, untabled, family
):
    src = tiny_model(family)
    untabled(architectures.table_for_config(read_config(src)).family)
    out = tmp_path / "out"
    plan, _ = apply(ApplyConfig(model=str(src), direction=[direction_file], out=out))
    assert plan.derived and plan.family.endswith("(derived)") and plan.full
    assert "table: derived" in (out / "README.md").read_text()
    report = verify(VerifyConfig(source=str(src), edited=out, dtype="float64"), log=lambda _: None)
    assert report.passed, report.failures
    assert report.leak_checked and report.residual_leak <= derive.PROOF_LEAK


def _untabled_model(folder, cls_name="Starcoder2"):
    """A tiny checkpoint of a plain decoder no table covers (Starcoder2: LayerNorm pre-norms,
    biases on both writers)."""
    config = getattr(transformers, f"{cls_name}Config")(
        vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        use_bias=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls_name}ForCausalLM")(config)
    _reinit(model, offset_norms=True)
    model.save_pretrained(folder, max_shard_size="20KB")
    build_tokenizer().save_pretrained(folder)
    return folder


def test_a_family_without_a_table_is_derived_end_to_end(tmp_path, direction_file):
    src = _untabled_model(tmp_path / "src")
    with pytest.raises(UnsupportedModelError):
        architectures.table_for_config(read_config(src))
    out = tmp_path / "out"
    result = cli("apply", src, "--direction", direction_file, "--out", out)
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["derived"] and plan["family"] == "starcoder2 (derived)"
    assert {op["tensor"] for op in plan["ops"]} >= {
        "model.layers.1.self_attn.o_proj.bias", "model.layers.1.mlp.c_proj.weight"
    }  # fmt: skip
    assert "table: derived" in (out / "README.md").read_text()
    result = cli("verify", src, out, "--dtype", "float64")
    assert result.exit_code == 0, result.output


def _refused(args: list[str], tmp_path) -> str:
    line = one_line_error(cli(*args))
    assert not (tmp_path / "out").exists()
    return line


def test_a_name_that_is_no_transformers_class_is_refused(tmp_path, direction_file):
    src = _untabled_model(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    out = _refused(["apply", str(src), "--direction", str(direction_file),
                    "--out", str(tmp_path / "out")], tmp_path)  # fmt: skip
    assert "NoSuchModelForCausalLM" in out and "no transformers model class" in out


def test_an_unclassifiable_writer_is_refused_naming_its_module(
    tmp_path, direction_file, monkeypatch
):
    """Attention whose output is LayerNorm'd before the residual add: no weight edit is exact,
    and the refusal names the norm."""
    from transformers.models.starcoder2 import modeling_starcoder2 as m

    init, forward = m.Starcoder2Attention.__init__, m.Starcoder2Attention.forward

    def patched_init(self, config, layer_idx=None):
        init(self, config, layer_idx)
        self.out_norm = torch.nn.LayerNorm(config.hidden_size)

    def patched_forward(self, *args, **kwargs):
        out, *rest = forward(self, *args, **kwargs)
        return (self.out_norm(out), *rest)

    monkeypatch.setattr(m.Starcoder2Attention, "__init__", patched_init)
    monkeypatch.setattr(m.Starcoder2Attention, "forward", patched_forward)
    monkeypatch.setattr(derive, "_DERIVED", {})  # not the unpatched class's derivation
    src = _untabled_model(tmp_path / "src")
    out = _refused(["apply", str(src), "--direction", str(direction_file),
                    "--out", str(tmp_path / "out")], tmp_path)  # fmt: skip
    assert "model.layers.0.self_attn.out_norm (LayerNorm)" in out and "not an RMSNorm" in out


@pytest.mark.usefixtures("wide_consoles")
def test_architectures_derives_one_config_without_weights(tmp_path):
    src = _untabled_model(tmp_path / "src")
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    result = cli("architectures", folder)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "edited as starcoder2 (derived) (a derived table" in text
    assert "mlp.c_proj" in text and "d_model 32" in text
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    listed = flat(cli("architectures").output)
    assert "any other" in listed and "derived" in listed and "refused" in listed


def test_a_tensor_kind_the_instance_lacked_is_refused(tmp_path, untabled):
    """The instance may not have built every layer kind of the real checkpoint: a tensor of a
    kind it never saved could write unseen, so apply refuses it rather than leave it."""
    src = _untabled_model(tmp_path / "src")
    table = derive.table_or_derived(read_config(src))
    names = list(Checkpoint.open(src).tensors)
    derive.check_coverage(table, [*names, "model.layers.7.mlp.c_proj.weight"])  # more layers
    with pytest.raises(
        UnsupportedModelError, match=r"model\.layers\.3\.cross_attn\.o_proj\.weight"
    ):
        derive.check_coverage(table, [*names, "model.layers.3.cross_attn.o_proj.weight"])
