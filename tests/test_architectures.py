"""Architecture tables: strictly validated data, chosen from config.json."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from pydantic import ValidationError

from orthoedit.errors import UnsupportedModelError
from orthoedit.model.architectures import ArchitectureTable, load_tables, table_for_config
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


def test_multimodal_gemma3_not_yet_supported():
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    with pytest.raises(UnsupportedModelError, match="not yet supported"):
        table_for_config(cfg)


def test_post_norm_families_are_marked():
    tables = load_tables()
    assert {f for f, t in tables.items() if t.post_norm} == {"gemma2", "gemma3", "olmo2"}
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
        (lambda t: t["writers"][1].update(axis=2), "axis 2 is for mlp experts"),
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
