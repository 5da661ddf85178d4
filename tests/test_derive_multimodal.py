"""Derived tables of multimodal wrappers (issue 35, point 2): with its table hidden, each of
the six image-text(-audio) families has its language model's writers derived as a text model's
(under the wrapper's names on disk) and its projector's last layer found by observation on an
image prompt (and an audio clip for Gemma 4), as an ``embed`` writer (model/derive/media.py,
projector.py).

The derived plan equals the shipped table's tensor for tensor; the derived edit equals the
plan's hooks (and, pre-norm, the paper's ablation) on an image prompt and leaves no r in the
residual stream there; the towers are byte-identical; ``orthoedit architectures`` derives a
wrapper from its config alone. A projector whose output is changed after it, and a wrapper that
adds into the residual stream between blocks (Qwen3-VL's deepstack mergers), are refused with
the module named."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import orthoedit.model.architectures as architectures
import orthoedit.model.derive as derive
from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import apply
from orthoedit.errors import UnsupportedModelError
from orthoedit.model.checkpoint import Checkpoint
from orthoedit.model.source import read_config
from orthoedit.runtime.hooks import ablation_hooks, plan_hooks
from test_cli import cli, flat, one_line_error
from test_derive import _ops, _plan
from test_equivalence import _load, _tensors
from test_families import LEAK, leak
from tiny import CLASSES, MULTIMODAL, image_prompt

TOWERS = ("vision", "visual", "audio", "projector")
SHIPPED = architectures.load_tables()
WRAPPERS = {t.family for t in SHIPPED.values() for f in MULTIMODAL if CLASSES[f] in t.architectures}


@pytest.fixture(autouse=True, scope="module")
def without_their_tables():
    """The six wrappers' tables hidden for the whole module, each wrapper derived once and
    kept; torch on one thread (tiny models: on a loaded machine a second thread costs more
    than it gives)."""
    kept = {k: v for k, v in SHIPPED.items() if k not in WRAPPERS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(architectures, "load_tables", lambda: kept)
        patch.setattr(derive, "load_tables", lambda: kept)
        patch.setattr(derive, "_DERIVED", {})
        yield
    torch.set_num_threads(threads)


def _derived(src):
    """(the shipped table, the one derived without it) for the tiny checkpoint ``src``."""
    config = read_config(src)
    shipped = next(t for t in SHIPPED.values() if config["architectures"][0] in t.architectures)
    derived = derive.table_or_derived(config)
    assert derived.derived and derived.family.endswith("(derived)")
    return shipped, derived


def _projectors(table) -> dict:
    return {
        w.module: w for w in table.writers if w.site == "embed" and "embed_tokens" not in w.module
    }


@pytest.mark.parametrize("family", MULTIMODAL)
def test_a_wrapper_is_derived_as_its_table_plans_it(tiny_model, direction_file, family):
    src = tiny_model(family)
    shipped, derived = _derived(src)
    assert _ops(_plan(derived, src, direction_file)) == _ops(_plan(shipped, src, direction_file))
    for key in ("module", "final_norm"):
        assert getattr(derived.blocks, key) == getattr(shipped.blocks, key)
    assert derived.unembed.module == shipped.unembed.module
    assert (derived.config.tie, derived.config.tie_default) == (
        shipped.config.tie, shipped.config.tie_default
    )  # fmt: skip
    mine, theirs = _projectors(derived), _projectors(shipped)
    assert set(mine) == set(theirs) and len(mine) == 1 + (family == "gemma4")
    for module, w in mine.items():  # biases: as the plans above (a table lists absent ones)
        assert (w.tensor, w.axis) == (theirs[module].tensor, theirs[module].axis)
    for prefix, spellings in derived.checkpoint_prefix_aliases.items():
        assert set(spellings) <= set(shipped.checkpoint_prefix_aliases[prefix])


@torch.no_grad()
@pytest.mark.parametrize("family", MULTIMODAL)
def test_the_derived_edit_is_exact_on_an_image(tiny_model, direction_file, tmp_path, family):
    """Applied with the derived table: on an image prompt (Gemma 4's with audio too), edited
    logits equal the plan's hooks and, pre-norm, the paper's ablation; no r enters a block; the
    towers are byte-identical, the projector's last layer edited."""
    src = tiny_model(family)
    _, derived = _derived(src)
    out = tmp_path / "out"
    plan, _ = apply(ApplyConfig(model=str(src), direction=[direction_file], out=out, tied="untie"))
    assert plan.derived and "table: derived" in (out / "README.md").read_text()
    before, after = _tensors(src), _tensors(out)
    unedited = [n for n in before if n not in plan.edited]
    raw = {n: (before[n].reshape(-1).view(torch.uint8), after[n].reshape(-1).view(torch.uint8))
           for n in unedited}  # fmt: skip
    assert all(torch.equal(a, b) for a, b in raw.values())
    assert any(t in n for n in unedited for t in ("vision", "visual"))
    projector = {w.tensor for w in _projectors(derived).values()}
    assert projector <= plan.edited
    assert {n for n in plan.edited if any(t in n for t in TOWERS)} <= projector | {
        w.bias for w in _projectors(derived).values()
    }

    call = image_prompt(family, json.loads((src / "config.json").read_text()))
    source, edited = _load(src), _load(out)  # float32: Gemma 4's audio tower runs in no other
    r = torch.from_numpy(plan.r)
    with plan_hooks(source, plan, Checkpoint.open(src)):
        hooked = source(**call).logits
    logits = edited(**call).logits
    assert float((hooked - logits).abs().max()) <= 1e-4
    assert float((source(**call).logits - logits).abs().max()) > 1e-2  # the edit did something
    if not derived.post_norm:
        with ablation_hooks(source, derived, plan.vectors(None), plan.n_layers):
            paper = source(**call).logits
        assert float((paper - logits).abs().max()) <= 1e-4
    assert leak(source, derived, plan.n_layers, r, [call]) > 1e-2
    assert leak(edited, derived, plan.n_layers, r, [call]) <= LEAK


@pytest.mark.parametrize("family", ["mistral3", "gemma4"])
def test_architectures_derives_a_wrapper_from_its_config_alone(
    tiny_model, tmp_path, monkeypatch, family
):
    monkeypatch.setattr(derive, "_DERIVED", {})  # derived here, from config.json alone
    src = tiny_model(family)
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    result = cli("architectures", folder)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "(derived) (a derived table" in text and "d_model 32" in text
    assert ("embedding_projection" if family == "gemma4" else "linear_2") in text
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_a_projector_changed_after_its_last_layer_is_refused(
    tiny_model, direction_file, tmp_path, monkeypatch
):
    """The image tokens' embeddings reach the first block doubled: no module's output is
    them, so derivation names the nearest one and refuses, leaving nothing behind."""
    from transformers.models.mistral3 import modeling_mistral3 as m

    features = m.Mistral3Model.get_image_features

    def doubled(self, *args, **kwargs):
        out = features(self, *args, **kwargs)
        out.pooler_output = [2 * x for x in out.pooler_output]
        return out

    monkeypatch.setattr(m.Mistral3Model, "get_image_features", doubled)
    src = tiny_model("mistral3")
    monkeypatch.setattr(derive, "_DERIVED", {})  # not the unpatched class's derivation
    line = one_line_error(
        cli("apply", src, "--direction", direction_file, "--out", tmp_path / "out")
    )
    assert "nearest: model.multi_modal_projector.linear_2 (Linear)" in line
    assert "changes them after the projector" in line
    assert not (tmp_path / "out").exists()


def test_a_writer_between_blocks_is_refused_by_name(tmp_path):
    """Qwen3-VL (no table) adds its deepstack mergers' outputs into the residual stream after
    the first blocks, outside any block: the probe of blocks cannot classify them."""
    config = transformers.Qwen3VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                     "vocab_size": 256, "rope_parameters": {"rope_type": "default",
                     "rope_theta": 1e6, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 32, "deepstack_visual_indexes": [0, 1],
                       "num_position_embeddings": 16, "patch_size": 8},
        image_token_id=250, video_token_id=251, vision_start_token_id=252,
        vision_end_token_id=253,
    ).to_dict()  # fmt: skip
    config["architectures"] = ["Qwen3VLForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = one_line_error(cli("architectures", tmp_path))
    assert "between model.language_model.layers.0 and model.language_model.layers.1" in line
    assert "nearest: model.visual.deepstack_merger_list.0.linear_fc2 (Linear)" in line


def _respelled(src, dst, aliases: dict) -> None:
    """A copy of the checkpoint ``src`` with every tensor under a prefix alias's spelling."""
    from safetensors.torch import load_file, save_file

    def name(n: str) -> str:
        prefix = next((p for p in aliases if n.startswith(p)), None)
        return aliases[prefix][0] + n[len(prefix) :] if prefix else n

    dst.mkdir()
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            save_file({name(k): v for k, v in load_file(path).items()}, dst / path.name,
                      metadata={"format": "pt"})  # fmt: skip
        elif path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            index["weight_map"] = {name(k): v for k, v in index["weight_map"].items()}
            (dst / path.name).write_text(json.dumps(index))
        else:
            (dst / path.name).write_bytes(path.read_bytes())


def test_a_checkpoint_in_the_other_spelling_is_planned_and_covered(
    tiny_model, direction_file, tmp_path
):
    """transformers saves Mistral 3's nesting as older checkpoints do and reads its own
    run-time spelling too: the derived prefix aliases find the writers either way, and the
    coverage check counts either spelling as the instance's."""
    src = tiny_model("mistral3")
    shipped, derived = _derived(src)
    assert derived.checkpoint_prefix_aliases == {
        "language_model.model.": ["model.language_model."],
        "multi_modal_projector.": ["model.multi_modal_projector."],
    }
    other = tmp_path / "respelled"
    _respelled(src, other, derived.checkpoint_prefix_aliases)
    derive.check_coverage(derived, Checkpoint.open(other).tensors)
    ops = _ops(_plan(derived, other, direction_file))
    assert ops == _ops(_plan(shipped, other, direction_file))
    assert {op[0].split(".")[0] for op in ops} == {"model"}  # every writer found respelled


def test_the_proof_sees_a_projector_left_out(tiny_model, monkeypatch):
    """Without its projector a table passes a text prompt but not the image prompt: the image
    tokens' embeddings carry r into the first block."""
    import orthoedit.model.derive.assemble as assemble

    monkeypatch.setattr(assemble, "_media_writers", lambda *args: [])
    config = read_config(tiny_model("mistral3"))
    with pytest.raises(UnsupportedModelError, match=r"the media prompt.*residual leak"):
        derive.derive_table(config)
