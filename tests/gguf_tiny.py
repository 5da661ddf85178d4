"""Tiny GGUF files written in-process with the gguf package, from the tiny checkpoints of
``tests/tiny.py``, laid out as llama.cpp's converter lays them out (the steps transformers
undoes on load: Llama's q/k row permutation, Gemma's norms stored as 1 + w, experts stacked).

``write_tiny_gguf`` checks nothing itself: ``tests/test_gguf.py`` proves each layout by loading
the file with transformers and comparing its logits with the checkpoint it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

#: transformers model_type -> GGUF architecture, for the families tested here.
ARCH = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
_TYPE = gguf.GGMLQuantizationType


def _state(folder: Path) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return {k: v.astype(np.float32) for k, v in state.items()}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (transformers reverses it on load)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _stack_experts(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``…experts.{e}.name`` tensors stacked into ``…experts.name`` ``[experts, out, in]``."""
    out, groups = {}, {}
    for name, value in state.items():
        head, sep, tail = name.partition(".experts.")
        first, _, rest = tail.partition(".")
        if sep and first.isdigit() and not head.endswith("shared"):
            groups.setdefault(f"{head}.experts.{rest}", {})[int(first)] = value
        else:
            out[name] = value
    for name, parts in groups.items():
        out[name] = np.stack([parts[e] for e in sorted(parts)])
    return out


def _tensors(config: dict, state: dict[str, np.ndarray], arch: str):
    """(GGUF name, float32 values) in converter order."""
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(key, config["num_hidden_layers"])
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
    for hf, value in _stack_experts(state).items():
        base, _, suffix = hf.rpartition(".")
        if "rotary_emb" in hf:
            continue
        name = names.get_name(base)
        if name is None:
            raise KeyError(f"{hf}: no GGUF name for {arch}")
        if arch == "llama" and base.endswith("q_proj"):
            value = _permute(value, heads)
        if arch == "llama" and base.endswith("k_proj"):
            value = _permute(value, kv or heads)
        if arch == "gemma3" and "norm" in base and value.ndim == 1:
            value = value + 1.0
        yield f"{name}.{suffix}", value


def _tokenizer(writer: gguf.GGUFWriter, folder: Path, config: dict) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    for field, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if config.get(field) is not None:
            add(config[field])
    writer.add_add_bos_token(False)
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def _metadata(writer: gguf.GGUFWriter, config: dict, arch: str) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    model_type = config["model_type"]
    mapping = GGUF_CONFIG_MAPPING.get(model_type.removesuffix("_text")) or GGUF_CONFIG_MAPPING[arch]
    writer.add_name(f"tiny {model_type}")
    for gguf_key, hf_key in mapping.items():
        value = config.get(hf_key) if hf_key else None
        if value is None or isinstance(value, list | dict):
            continue
        key = f"{arch}.{gguf_key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
    if arch == "llama" and config.get("head_dim") is None:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)


def write_tiny_gguf(folder: Path, out: Path, types: str | dict[str, str] = "F32") -> Path:
    """A GGUF of the tiny checkpoint in ``folder``. ``types``: one type for every matrix, or
    ``{substring of the GGUF name: type}`` (first match; "*" for the rest); vectors stay F32,
    as llama.cpp keeps them."""
    config = json.loads((folder / "config.json").read_text())
    arch = ARCH[config["model_type"]]
    writer = gguf.GGUFWriter(out, arch)
    _metadata(writer, config, arch)
    _tokenizer(writer, folder, config)
    rules = {"*": types} if isinstance(types, str) else types
    for name, value in _tensors(config, _state(folder), arch):
        kind = next((t for k, t in rules.items() if k != "*" and k in name), rules.get("*", "F32"))
        if value.ndim == 1:
            kind = "F32"
        qtype = _TYPE[kind]
        data = gguf.quants.quantize(value, qtype) if kind != "F32" else value
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
