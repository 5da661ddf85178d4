"""The tiny instance a table is derived on: config.json shrunk, the class built on the CPU,
every parameter randomized (docs/design.md §1, model/derive)."""

from __future__ import annotations

import copy

from ...errors import UnsupportedModelError
from ..architectures import supported_architectures

_SHRINK = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "intermediate_size": 96, "n_inner": 96,
    "ffn_hidden_size": 96, "moe_intermediate_size": 40, "shared_expert_intermediate_size": 80,
    "moe_shared_expert_intermediate_size": 80, "intermediate_size_mlp": 96,
    "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "head_dim": 24,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "top_k_experts": 2, "moe_topk": 2, "n_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "vocab_size": 512, "max_position_embeddings": 256,
    "n_positions": 256, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16, "v_head_dim": 24, "sliding_window": 64,
}  # fmt: skip
_PER_LAYER_LISTS = ("layer_types", "layers_block_type", "hybrid_override_pattern")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOKENS = (2, 24)  # the instance's batch and length: enough tokens to route every expert


def _layer_count(config: dict) -> int:
    """The number of blocks config.json gives: a count, or a list of per-block kinds."""
    for key in (*_LAYER_KEYS, *_PER_LAYER_LISTS):
        value = config.get(key)
        if isinstance(value, int) or (isinstance(value, list | str) and value):
            return value if isinstance(value, int) else len(value)
    raise UnsupportedModelError("config.json gives no number of layers (num_hidden_layers).")


def _n_layers(config: dict, computed: list | None = None) -> int:
    """Enough layers for every kind listed per layer (a prefix: offsets like first_k_dense
    stay valid), and past the first dense / interleaved ones. ``computed``: the kinds the
    config class computes from periods and offsets (Jamba's attention every 8th layer)."""
    total = _layer_count(config)
    need = 2
    for kinds in [config.get(key) for key in _PER_LAYER_LISTS] + [computed]:
        if isinstance(kinds, list | str) and kinds:
            need = max(need, max(list(kinds).index(k) for k in set(kinds)) + 1)
    for key in ("first_k_dense_replace", "num_dense_layers"):
        need = max(need, int(config.get(key) or 0) + 1)
    need = max(need, int(config.get("interleave_moe_layer_step") or 0))
    return min(total, need)


def computed_kinds(cls, config: dict) -> list | None:
    """The per-layer kinds the config class computes (``layers_block_type``, ``layer_types``)
    where config.json does not list them."""
    try:
        conf = cls.config_class.from_dict(_floats(dict(config)))
    except Exception:  # the shrunk build reports what is wrong with the config
        return None
    for key in _PER_LAYER_LISTS:
        kinds = getattr(conf, key, None)
        if isinstance(kinds, list | tuple) and kinds and key not in config:
            return [str(k) for k in kinds]
    return None


def shrunk_config(config: dict, computed: list | None = None) -> dict:
    """A copy of config.json sized for a tiny instance (never larger than the original)."""
    small = copy.deepcopy(config)
    small.pop("quantization_config", None)  # the instance is plain floats; apply checks dtypes
    for key, limit in _SHRINK.items():
        if isinstance(small.get(key), int) and small[key] > limit:
            small[key] = limit
    n = _n_layers(config, computed)
    for key in _LAYER_KEYS:
        if isinstance(small.get(key), int):
            small[key] = n
    for key in _PER_LAYER_LISTS:
        if isinstance(small.get(key), list | str):
            small[key] = small[key][:n]
    if isinstance(small.get("mlp_only_layers"), list):
        small["mlp_only_layers"] = [i for i in small["mlp_only_layers"] if i < n]
    if isinstance(small.get("num_kv_shared_layers"), int):
        small["num_kv_shared_layers"] = min(small["num_kv_shared_layers"], n // 2)
    vocab = small.get("vocab_size")
    for key in _TOKEN_IDS:
        if isinstance(small.get(key), int) and isinstance(vocab, int) and small[key] >= vocab:
            small[key] = vocab - 1
    return small


def model_class(config: dict):
    """The transformers class config.json names; refuses what derivation cannot handle."""
    import transformers

    archs = config.get("architectures") or [None]
    arch = archs[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported: no table, and no transformers model class "
            f"to derive one from; supported: {', '.join(supported_architectures())}"
        )
    for key in ("vision_config", "audio_config"):
        if isinstance(config.get(key), dict):
            raise UnsupportedModelError(
                f"{arch} has no table and a {key}: a multimodal wrapper's projector writes the "
                "image or audio tokens' embeddings, which derivation does not classify yet."
            )
    return cls


def build_instance(config: dict):
    """(model in float64 on the CPU, the shrunk config dict). A shrunk size that the config
    class or the model rejects is put back to its original value, one key at a time."""
    cls = model_class(config)
    small = shrunk_config(config, computed_kinds(cls, config))
    changed = [k for k in small if small[k] != config.get(k)]
    while True:
        try:
            return _runs(_build(cls, small), small), small
        except Exception as err:
            if not changed:
                raise UnsupportedModelError(
                    f"{cls.__name__}: a tiny instance cannot be built from config.json ({err})."
                ) from err
            key = changed.pop(0)
            small[key] = copy.deepcopy(config[key])


def _floats(value):
    """config.json's spelling of Infinity and NaN (``{"__float__": "Infinity"}``) as floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and isinstance(value["__float__"], str):
            return float(value["__float__"])
        return {k: _floats(v) for k, v in value.items()}
    return [_floats(v) for v in value] if isinstance(value, list) else value


def _runs(model, small: dict):
    """The instance, once a forward pass succeeds (some shrunk sizes fail only there)."""
    import torch

    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        model(input_ids=torch.arange(8).reshape(1, 8) % vocab)
    return model


def _build(cls, small: dict):
    import torch

    fields = {k: _floats(v) for k, v in small.items() if k != "architectures"}
    conf = cls.config_class.from_dict(fields)
    torch.manual_seed(0)
    model = cls._from_config(
        conf, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm gains and biases: random, so each is found by its values
                p.mul_(1 + 0.3 * torch.randn_like(p)).add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    model.config.use_cache = False
    return model.eval()
