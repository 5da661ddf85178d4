"""What apply writes besides the weights: the card, plan.json, config and the copied files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import folder_digest, leftovers
from orthoedit import __version__
from orthoedit.cli import app
from orthoedit.config import ApplyConfig
from orthoedit.edit.apply import apply
from orthoedit.edit.plan import Plan
from orthoedit.model.checkpoint import INDEX_NAME, Checkpoint

BASE = "someone/tiny-llama-chat"
SOURCE_README = (
    "---\nlicense: llama3.2\nlanguage: [en, de]\ntags: [source-only-tag]\n---\n"
    "# The source card SRC-MARKER\n"
)
EXTRA_WEIGHTS = ("pytorch_model.bin", "model.gguf", "consolidated.00.pth")
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special.txt",
)


def front_matter(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def decorated(tiny_model, tmp_path_factory):
    """A tied llama with a README, other weight formats and a custom file beside it."""
    src = tmp_path_factory.mktemp("card") / "src"
    shutil.copytree(tiny_model("llama", tie=True), src)
    (src / "README.md").write_text(SOURCE_README)
    torch.save({"w": torch.ones(2)}, src / "pytorch_model.bin")
    (src / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    torch.save({"w": torch.zeros(2)}, src / "consolidated.00.pth")
    (src / "special.txt").write_text("keep me\n")
    return src


@pytest.fixture(scope="module")
def edited(decorated, direction_file, tmp_path_factory):
    """``orthoedit apply`` through the CLI, with --base-model."""
    before = folder_digest(decorated)
    out = tmp_path_factory.mktemp("card-out") / "edited"
    result = CliRunner().invoke(
        app,
        [
            "apply",
            str(decorated),
            "--direction",
            str(direction_file),
            "--out",
            str(out),
            "--base-model",
            BASE,
        ],
    )
    assert result.exit_code == 0, result.output
    assert folder_digest(decorated) == before
    assert leftovers(out.parent) == []
    return out


def test_card_front_matter(edited):
    meta, _ = front_matter((edited / "README.md").read_text())
    assert meta["base_model"] == BASE
    assert meta["library_name"] == "transformers"
    assert "orthoedit" in meta["tags"]
    assert "source-only-tag" not in meta["tags"]
    assert meta["license"] == "llama3.2" and meta["language"] == ["en", "de"]  # carried over
    assert meta["base_model_relation"] == "finetune"


def test_card_license_duties(edited):
    _, body = front_matter((edited / "README.md").read_text())
    assert "**Built with Llama**" in body  # the display the Llama 3.2 license asks for
    assert "Llama 3.2 Community License" in body
    assert "Llama 3.2 is licensed under the Llama 3.2 Community License" in body  # notice
    assert body.index("## Evaluation") < body.index("## License")
    assert "orthoedit push --eval" in body  # placeholder until push fills it in


def test_card_unknown_or_missing_license(decorated, direction_file, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(decorated, src)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: acme-open\n---\nhi\n")
    apply(ApplyConfig(model=str(src), direction=direction_file, out=tmp_path / "a"))
    meta, body = front_matter((tmp_path / "a" / "README.md").read_text())
    assert meta["license"] == "other" and meta["license_name"] == "acme-open"
    assert "license: `acme-open`" in body and "Built with" not in body
    (src / "README.md").unlink()
    apply(ApplyConfig(model=str(src), direction=direction_file, out=tmp_path / "b"))
    meta, body = front_matter((tmp_path / "b" / "README.md").read_text())
    assert "license" not in meta
    assert "not recorded in the source card" in body


def test_card_body_records_the_edit(edited, direction_file):
    _, body = front_matter((edited / "README.md").read_text())
    assert "SRC-MARKER" not in body  # the source README is replaced, not appended
    assert sha256(direction_file) in body
    assert "sites: embed, attn, mlp" in body
    assert "layers: 0:2 of 2" in body
    assert "policy `untie`" in body
    assert "lm_head.weight written as the original embedding" in body
    assert f"orthoedit {__version__}" in body or f"| orthoedit | {__version__} |" in body
    assert "tensors edited: 5" in body


def test_card_reflects_other_options(decorated, direction_file, tmp_path):
    out = tmp_path / "partial"
    plan, folder = apply(
        ApplyConfig(
            model=str(decorated),
            direction=direction_file,
            out=out,
            sites=["attn"],
            layers="1:2",
            tied="skip",
        )
    )
    assert folder == out.resolve()
    meta, body = front_matter((out / "README.md").read_text())
    assert "base_model" not in meta  # a local source and no --base-model: nothing to claim
    assert "orthoedit" in meta["tags"]
    assert "sites: attn" in body and "sites: embed" not in body
    assert "layers: 1:2 of 2 (1 edited)" in body
    assert "policy `skip`" in body
    assert "tensors edited: 1" in body
    assert plan.ops[0].tensor in (out / "plan.json").read_text()


def test_files_copied_and_skipped(decorated, edited):
    names = {p.name for p in edited.iterdir()}
    for name in EXTRA_WEIGHTS:
        assert name not in names
    for name in COPIED:
        assert (edited / name).read_bytes() == (decorated / name).read_bytes(), name
    shards = {p.name for p in decorated.glob("model-*.safetensors")}
    expected = {
        *shards,
        "model-lm_head.safetensors",
        INDEX_NAME,
        "config.json",
        "README.md",
        "plan.json",
        "orthoedit",
        ".orthoedit-output.json",  # the marker that lets --overwrite replace it
        *COPIED,
    }
    assert names == expected
    # the direction sits in a subfolder: no tool may take it for part of the weights
    assert {p.name for p in (edited / "orthoedit").iterdir()} == {"direction.safetensors"}


def test_direction_copy_and_plan(edited, direction_file):
    assert sha256(edited / "orthoedit" / "direction.safetensors") == sha256(direction_file)
    plan = Plan.load(edited)
    assert plan.direction_files[0].sha256 == sha256(direction_file)
    assert plan.base_model == BASE
    assert plan.tied and plan.tied_policy == "untie" and plan.write_lm_head
    assert len(plan.ops) == 5


def test_untied_config_and_index(decorated, edited):
    src_config = json.loads((decorated / "config.json").read_text())
    config = json.loads((edited / "config.json").read_text())
    assert src_config["tie_word_embeddings"] is True
    assert config["tie_word_embeddings"] is False
    assert {k: v for k, v in config.items() if k != "tie_word_embeddings"} == {
        k: v for k, v in src_config.items() if k != "tie_word_embeddings"
    }
    index = json.loads((edited / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    assert weight_map["lm_head.weight"] == "model-lm_head.safetensors"
    assert set(weight_map.values()) == {p.name for p in edited.glob("*.safetensors")}
    ckpt = Checkpoint.open(edited)  # the index agrees with the shards
    assert index["metadata"]["total_size"] == sum(f.size - f.data_start for f in ckpt.files)
    source = Checkpoint.open(decorated)
    head, embed = ckpt.read("lm_head.weight"), source.read("model.embed_tokens.weight")
    assert np.array_equal(head, embed)  # the original, unedited embedding
    assert not np.array_equal(ckpt.read("model.embed_tokens.weight"), embed)


def test_single_file_tied_source_becomes_sharded(tiny_model, direction_file, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama", tie=True, max_shard_size="1GB")
    assert (src / "model.safetensors").is_file() and not (src / INDEX_NAME).exists()
    out = tmp_path / "edited"
    plan, _ = apply(ApplyConfig(model=str(src), direction=direction_file, out=out))
    assert plan.write_lm_head
    assert not (out / "model.safetensors").exists()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(p.name for p in out.glob("model*.safetensors")) == shards
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"]["lm_head.weight"] == shards[1]
    with safe_open(str(out / shards[1]), "pt") as f:
        assert list(f.keys()) == ["lm_head.weight"]
    # the first shard keeps the source file's header byte for byte
    source, edited = Checkpoint.open(src), Checkpoint.open(out)
    assert edited.files[0].header_bytes == source.files[0].header_bytes
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    model, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not model.config.tie_word_embeddings
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    assert head.data_ptr() != embed.data_ptr()
    original = torch.from_numpy(source.read("model.embed_tokens.weight"))
    assert torch.equal(head.detach().double(), original)
    r = torch.tensor(plan.directions[0], dtype=torch.float64)
    r = r / r.norm()
    residual = (embed.detach().double() @ r).norm() / embed.detach().double().norm()
    assert residual < 1e-6  # the loaded embedding is orthogonal to r; the head is not
    assert (original.double() @ r).norm() / original.double().norm() > 1e-2
