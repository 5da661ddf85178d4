"""Architecture tables: strictly validated data, chosen from config.json."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from pydantic import ValidationError

from orthoedit.errors import UnsupportedModelError
from orthoedit.model.architectures import ArchitectureTable, load_tables, table_for_config
from test_cli import wide_consoles  # noqa: F401 (a fixture)
from tiny import FAMILIES

REQUIRED = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "olmo2",
}


def test_every_required_family_has_a_table():
    assert set(load_tables()) >= REQUIRED
    assert set(FAMILIES) <= set(load_tables())


@pytest.mark.parametrize("family", FAMILIES)
def test_table_chosen_from_tiny_model_config(tiny_model, family):
    config = json.loads((tiny_model(family) / "config.json").read_text())
    assert table_for_config(config).family == family


def test_model_type_used_when_architectures_missing():
    assert table_for_config({"model_type": "qwen2"}).family == "qwen2"


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        table_for_config({"architectures": ["FooForCausalLM"], "model_type": "foo"})
    assert "FooForCausalLM" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_multimodal_checkpoints_have_their_own_tables():
    """A wrapper nests the language model (and names it otherwise on disk) beside its towers:
    its table is not the text model's."""
    for arch, family in [
        ("Gemma3ForConditionalGeneration", "gemma3_multimodal"),
        ("Mistral3ForConditionalGeneration", "mistral3"),
        ("Gemma4ForConditionalGeneration", "gemma4"),
        ("Llama4ForConditionalGeneration", "llama4"),
        ("Qwen3_5MoeForConditionalGeneration", "qwen3_5_vl"),
        ("Lfm2VlForConditionalGeneration", "lfm2_vl"),
    ]:
        assert table_for_config({"architectures": [arch]}).family == family


def test_post_norm_families_are_marked():
    tables = load_tables()
    post = {"gemma2", "gemma3", "gemma3_multimodal", "gemma4", "gemma4_text", "glm4", "exaone4",
            "olmo2"}  # fmt: skip
    assert {f for f, t in tables.items() if t.post_norm} == post
    gemma_offsets = {w.post_norm.offset for w in tables["gemma2"].writers if w.post_norm}
    assert gemma_offsets == {1.0}
    assert {w.post_norm.offset for w in tables["olmo2"].writers if w.post_norm} == {0.0}


def test_readers_are_never_writers():
    for table in load_tables().values():
        for w in table.writers:
            assert not any(k in w.tensor for k in ("q_proj", "k_proj", "v_proj", "qkv", "gate"))


def _raw(family: str = "llama") -> dict:
    return json.loads(load_tables()[family].model_dump_json())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.update(unknown_field=1), "Extra inputs"),
        (lambda t: t["writers"][1].update(tensor="model.layers.{i}.o_proj.weight"), "placeholder"),
        (lambda t: t["writers"][0].update(tensor="model.embed.{layer}.weight"), "must not"),
        (lambda t: t["writers"][1].update(axis=3), "less than or equal"),
        (lambda t: t["writers"][1].update(axis=2), "axis 2 is for experts fused"),
        (lambda t: t["writers"][1].update(fused=True, axis=1), "fused experts are an mlp"),
        (lambda t: t["writers"][1].update(experts=["n"]), "only mlp writers can be experts"),
        (lambda t: t["writers"][2].update(experts=["n"]), "must contain {expert}"),
        (lambda t: t.update(writers=[t["writers"][0], t["writers"][1], t["writers"][1]]), "mlp"),
        (lambda t: t["unembed"].update(tied_to="nope.weight"), "tied_to"),
    ],
)
def test_schema_rejects_bad_tables(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ValidationError, match=message):
        ArchitectureTable.model_validate(raw)


def test_layernorm_post_norm_is_rejected():
    raw = _raw("gemma2")
    broken = copy.deepcopy(raw)
    broken["writers"][1]["post_norm"]["kind"] = "layernorm"
    with pytest.raises(ValidationError, match="rms"):
        ArchitectureTable.model_validate(broken)
    ArchitectureTable.model_validate(raw)  # the shipped one is fine


def test_shipped_yaml_round_trips(tmp_path):
    for table in load_tables().values():
        again = ArchitectureTable.model_validate(yaml.safe_load(yaml.safe_dump(table.model_dump())))
        assert again == table


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drop_tie_key", [False, True])
def test_dims_match_transformers_config(tiny_model, family, drop_tie_key):
    """Tables read config.json without transformers; they must agree with its config classes."""
    from transformers import AutoConfig

    config = json.loads((tiny_model(family) / "config.json").read_text())
    if drop_tie_key:
        config.pop("tie_word_embeddings", None)
    cfg = AutoConfig.for_model(**config)
    expect = (cfg.hidden_size, cfg.num_hidden_layers, bool(cfg.tie_word_embeddings))
    assert load_tables()[family].dims(config) == expect


# --- orthoedit architectures ---------------------------------------------------------------


@pytest.mark.usefixtures("wide_consoles")
def test_architectures_lists_every_family_and_every_refusal():
    from test_cli import cli, flat

    result = cli("architectures")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    for table in load_tables().values():
        assert table.family in text
        assert all(arch in text for arch in table.architectures)
        assert all(arch in text for arch in table.unsupported_architectures)


@pytest.mark.usefixtures("wide_consoles")
def test_architectures_checks_one_config_without_weights(tiny_model, tmp_path):
    from test_cli import cli, flat

    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model("qwen3") / "config.json").read_text())
    result = cli("architectures", folder)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "edited as qwen3" in text and "d_model 32" in text and "self_attn.o_proj" in text
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"architectures": ["FooForCausalLM"], "model_type": "foo"}, "FooForCausalLM"),
        (
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "quantization_config": {"quant_method": "gptq"}},
            "gptq",
        ),
    ],
)  # fmt: skip
def test_architectures_refuses_in_one_line(tmp_path, config, message):
    from conftest import folder_digest
    from test_cli import cli, one_line_error

    (tmp_path / "config.json").write_text(json.dumps(config))
    digest = folder_digest(tmp_path)
    assert message in one_line_error(cli("architectures", tmp_path))
    assert folder_digest(tmp_path) == digest


def test_nested_config_keys_and_prefix_aliases(tiny_model):
    """A multimodal checkpoint keeps its language model's size in text_config, and older
    checkpoints spell the nesting otherwise: both are read as the table says."""
    from orthoedit.edit.plan import _Names
    from orthoedit.model.architectures import config_value
    from orthoedit.model.checkpoint import Checkpoint

    config = {"text_config": {"hidden_size": 48, "num_hidden_layers": 3}, "hidden_size": 7}
    assert config_value(config, "text_config.hidden_size") == 48
    assert config_value(config, "text_config.missing") is None
    assert config_value(config, "hidden_size.deeper") is None
    raw = _raw("llama") | {"config": {"hidden_size": "text_config.hidden_size",
                                      "num_layers": "text_config.num_hidden_layers",
                                      "tie_default": False}}  # fmt: skip
    assert ArchitectureTable.model_validate(raw).dims(config) == (48, 3, False)

    raw = _raw("llama") | {"checkpoint_prefix_aliases": {"lm.model.": ["model."]}}
    names = _Names(ArchitectureTable.model_validate(raw), Checkpoint.open(tiny_model("llama")))
    assert names("lm.model.layers.{layer}.mlp.down_proj.weight", 1) == (
        "model.layers.1.mlp.down_proj.weight"
    )
    assert names("lm.model.nowhere.weight") == "lm.model.nowhere.weight"
