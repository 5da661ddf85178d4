"""The tiny test models are real, loadable, sharded checkpoints whose logits are not trivial."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import FAMILIES, build_tiny_model, build_tokenizer

EXPLICIT_HEAD_DIM = ("llama", "mistral", "qwen3", "gemma", "gemma2", "gemma3")
TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gpt2")
PROMPT = "How do I bake bread?"

Build = Callable[..., Path]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """build(family, **kwargs) -> out_dir, building each distinct model only once."""
    cache: dict[tuple[Any, ...], Path] = {}

    def get(family: str, **kwargs: Any) -> Path:
        key = (family, *sorted(kwargs.items()))
        if key not in cache:
            cache[key] = build_tiny_model(family, tmp_path_factory.mktemp(family), **kwargs)
        return cache[key]

    return get


def tensors(out: Path) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            result.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return result


def dtypes(out: Path) -> set[str]:
    found: set[str] = set()
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            found.update(f.get_slice(key).get_dtype() for key in f.keys())  # noqa: SIM118
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint(build: Build, family: str) -> None:
    out = build(family)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    saved = tensors(out)
    assert set(index["weight_map"]) == set(saved)
    assert ("lm_head.weight" in saved) is (family not in TIED_BY_DEFAULT)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    tok = build_tokenizer()
    assert generation["eos_token_id"] == tok.eos_token_id
    assert generation.get("do_sample", False) is False


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_cleanly_with_nontrivial_logits(build: Build, family: str) -> None:
    out = build(family)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    cfg = model.config
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 32
    if family in EXPLICIT_HEAD_DIM:
        assert cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size
    tok = AutoTokenizer.from_pretrained(out)
    assert cfg.vocab_size >= len(tok)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(build: Build, family: str) -> None:
    tok = AutoTokenizer.from_pretrained(build(family))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHow do I bake bread?<|end|>\n"
        "<|assistant|>\n"
    )
    no_prompt = tok.apply_chat_template(messages[1:], tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = encoded["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids


def test_tokenizer_handles_english() -> None:
    tok = build_tokenizer()
    for text in (PROMPT, "Please explain how a computer works.", "zebra quux ünïcode 42"):
        ids = tok(text).input_ids
        assert tok.decode(ids) == text  # byte-level: lossless, never unknown
    words = tok.tokenize(PROMPT)
    assert len(words) <= 8  # mostly whole words, not bytes
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


@pytest.mark.parametrize("tie", [True, False])
def test_llama_tying(build: Build, tie: bool) -> None:
    out = build("llama", tie=tie)
    assert ("lm_head.weight" in tensors(out)) is not tie
    model = AutoModelForCausalLM.from_pretrained(out)
    shared = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared is tie


def test_llama_bias(build: Build) -> None:
    saved = tensors(build("llama", bias=True))
    for layer in range(2):
        for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            assert saved[f"model.layers.{layer}.{name}"].shape == (32,)
    assert not any(k.endswith("bias") for k in tensors(build("llama")))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_bf16(build: Build, family: str) -> None:
    out = build(family, dtype=torch.bfloat16)
    assert dtypes(out) == {"BF16"}
    assert len(list(out.glob("*.safetensors"))) >= 2


def test_single_file_and_determinism(build: Build) -> None:
    single = build("qwen2", max_shard_size="1GB")
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()
    a, b, c = tensors(single), tensors(build("qwen2")), tensors(build("qwen2", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_rejects_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("bert", tmp_path)
    with pytest.raises(ValueError, match="llama"):
        build_tiny_model("qwen2", tmp_path, bias=True)
