"""The tiny instance a table is derived on: config.json shrunk, the class built on the CPU,
every parameter randomized (docs/design.md §1, model/derive)."""

from __future__ import annotations

import copy
import re

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
    "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 16,
}  # fmt: skip
_PER_LAYER_LISTS = ("layer_types", "layers_block_type", "hybrid_override_pattern")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOKENS = (2, 24)  # the instance's batch and length: enough tokens to route every expert
#: The sub-configs of a multimodal wrapper: its language model's, and its towers'.
TEXT, TOWERS = "text_config", ("vision_config", "audio_config")
_TOWER_LAYERS = ("num_hidden_layers", "depth", "num_layers")
_LAYER_INDICES = re.compile(r"(index|indexes|indices|layers?)$")  # lists of a tower's layers
_TOKEN_KEY = re.compile(r"(^|_)token_(id|index)$")


def text_part(config: dict) -> dict:
    """The language model's part of config.json: its text_config in a multimodal wrapper."""
    return config[TEXT] if isinstance(config.get(TEXT), dict) else config


def text_prefix(config: dict) -> str:
    """The dotted prefix of the language model's keys in config.json."""
    return f"{TEXT}." if isinstance(config.get(TEXT), dict) else ""


def towers(config: dict) -> list[str]:
    """The tower sub-configs config.json has (a multimodal wrapper's vision and audio)."""
    return [key for key in TOWERS if isinstance(config.get(key), dict)]


def _layer_count(config: dict) -> int:
    """The number of blocks config.json gives: a count, or a list of per-block kinds."""
    config = text_part(config)
    for key in (*_LAYER_KEYS, *_PER_LAYER_LISTS):
        value = config.get(key)
        if isinstance(value, int) or (isinstance(value, list | str) and value):
            return value if isinstance(value, int) else len(value)
    raise UnsupportedModelError("config.json gives no number of layers (num_hidden_layers).")


def _n_layers(config: dict, computed: list | None = None) -> int:
    """Enough layers for every kind listed per layer (a prefix: offsets like first_k_dense
    stay valid), and past the first dense / interleaved ones. ``computed``: the kinds the
    config class computes from periods and offsets (Jamba's attention every 8th layer)."""
    total, config = _layer_count(config), text_part(config)
    need = 2
    for kinds in [config.get(key) for key in _PER_LAYER_LISTS] + [computed, _overrides(config)]:
        if isinstance(kinds, list | str) and kinds:
            need = max(need, max(list(kinds).index(k) for k in set(kinds)) + 1)
    for key in ("first_k_dense_replace", "num_dense_layers"):
        need = max(need, int(config.get(key) or 0) + 1)
    need = max(need, int(config.get("interleave_moe_layer_step") or 0))
    return min(total, need)


def _overrides(config: dict) -> list | None:
    """Per layer, its entry of ``per_layer_config`` (layers whose sizes differ: Gemma 4's)."""
    per_layer = config.get("per_layer_config")
    if not isinstance(per_layer, dict) or not per_layer:
        return None
    return [repr(per_layer.get(str(i), per_layer.get(i))) for i in range(_layer_count(config))]


def computed_kinds(cls, config: dict) -> list | None:
    """The per-layer kinds the config class computes (``layers_block_type``, ``layer_types``)
    where config.json does not list them."""
    try:
        conf = cls.config_class.from_dict(_floats(dict(config)))
    except Exception:  # the shrunk build reports what is wrong with the config
        return None
    conf, config = conf.get_text_config(), text_part(config)
    for key in _PER_LAYER_LISTS:
        kinds = getattr(conf, key, None)
        if isinstance(kinds, list | tuple) and kinds and key not in config:
            return [str(k) for k in kinds]
    return None


def shrunk_config(config: dict, computed: list | None = None) -> dict:
    """A copy of config.json sized for a tiny instance (never larger than the original): the
    language model's sizes and layers, and a multimodal wrapper's towers' (one layer each, or as
    many as a list of their layer indices names)."""
    small = copy.deepcopy(config)
    small.pop("quantization_config", None)  # the instance is plain floats; apply checks dtypes
    text = text_part(small)
    _shrink_sizes(text)
    n = _n_layers(config, computed)
    for key in _LAYER_KEYS:
        if isinstance(text.get(key), int):
            text[key] = n
    for key in _PER_LAYER_LISTS:
        if isinstance(text.get(key), list | str):
            text[key] = text[key][:n]
    if isinstance(text.get("per_layer_config"), dict):
        text["per_layer_config"] = {k: v for k, v in text["per_layer_config"].items() if int(k) < n}
    if isinstance(text.get("mlp_only_layers"), list):
        text["mlp_only_layers"] = [i for i in text["mlp_only_layers"] if i < n]
    if isinstance(text.get("num_kv_shared_layers"), int):
        text["num_kv_shared_layers"] = min(text["num_kv_shared_layers"], n // 2)
    for key in towers(small):
        _shrink_tower(small[key], text_part(config).get("hidden_size"), text.get("hidden_size"))
    _renumber_tokens(small, text.get("vocab_size"))
    return small


def _shrink_sizes(part: dict) -> None:
    for key, limit in _SHRINK.items():
        if isinstance(part.get(key), int) and part[key] > limit:
            part[key] = limit


def _shrink_tower(tower: dict, d_model, small_d) -> None:
    """A tower shrunk like a language model, to one layer or as many as its lists of layer
    indices name; a size that must equal the language model's width (Qwen's out_hidden_size)
    follows it."""
    coupled = [k for k, v in tower.items() if isinstance(v, int) and v == d_model and v != 1]
    _shrink_sizes(tower)
    indexed = [i for k, v in tower.items() if _LAYER_INDICES.search(k) and isinstance(v, list)
               for i in v if isinstance(i, int)]  # fmt: skip
    need = max([1] + [i + 1 for i in indexed])  # layers some list names (deepstack's) stay
    for key in _TOWER_LAYERS:
        if isinstance(tower.get(key), int):
            tower[key] = min(tower[key], need)
    for key in coupled:
        if key not in _SHRINK and isinstance(small_d, int):
            tower[key] = small_d


def _renumber_tokens(small: dict, vocab) -> None:
    """Token ids past the shrunk vocabulary (special tokens; an image's placeholder) moved to
    its last ids, distinct ones kept distinct, the same in every part of config.json."""
    if not isinstance(vocab, int):
        return
    parts = [small, text_part(small)]
    keys = [(part, k) for part in parts for k in part if _TOKEN_KEY.search(k)]
    past = sorted({v for part, k in keys if isinstance(v := part[k], int) and v >= vocab})
    moved = {v: vocab - 1 - i for i, v in enumerate(past)}
    for part, key in keys:
        value = part[key]
        if isinstance(value, int):
            part[key] = moved.get(value, value)
        elif isinstance(value, list):
            part[key] = [moved.get(v, v) for v in value]


def special_ids(config: dict) -> set[int]:
    """Every token id config.json names (special tokens, media placeholders)."""
    found: set[int] = set()
    for part in (config, text_part(config)):
        for key, value in part.items():
            if _TOKEN_KEY.search(key):
                found |= {v for v in (value if isinstance(value, list) else [value])
                          if isinstance(v, int)}  # fmt: skip
    return found


def model_class(config: dict):
    """The transformers class config.json names; refuses a name that is none."""
    import transformers

    archs = config.get("architectures") or [None]
    arch = archs[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported: no table, and no transformers model class "
            f"to derive one from; supported: {', '.join(supported_architectures())}"
        )
    return cls


def _paths(config: dict, small: dict) -> list[list[str]]:
    """The dotted keys shrinking changed, in the groups they are put back in on failure: each
    tower's sizes together first (its layer count stays), then one key at a time."""
    groups = []
    for part in [*towers(small), TEXT, ""]:
        mine, theirs = (small, config) if not part else (small.get(part), config.get(part))
        if not isinstance(mine, dict) or not isinstance(theirs, dict):
            continue
        nested = part == "" and text_part(small) is not small
        changed = [
            f"{part}.{k}" if part else k
            for k in mine
            if mine[k] != theirs.get(k) and not (nested and k in (TEXT, *TOWERS))
        ]
        if part in TOWERS:
            groups.append([k for k in changed if k.rpartition(".")[2] not in _TOWER_LAYERS])
        else:
            groups += [[k] for k in changed]
    return [group for group in groups if group]


def _put_back(small: dict, config: dict, path: str) -> None:
    *parents, key = path.split(".")
    mine, theirs = small, config
    for part in parents:
        mine, theirs = mine[part], theirs[part]
    if key in theirs:
        mine[key] = copy.deepcopy(theirs[key])
    else:
        mine.pop(key, None)


def build_instance(config: dict, prompt=None):
    """(model in float32 on the CPU, the shrunk config dict, ``prompt(model, small)``: its
    media prompt, once it runs). A shrunk size that the config class or the model rejects is
    put back to its original value (a tower's sizes together, then one key at a time), as long
    as the instance stays tiny."""
    cls = model_class(config)
    small = shrunk_config(config, computed_kinds(cls, config))
    changed, err = _paths(config, small), None
    while True:
        if (size := _size(cls, small)) > _MAX_PARAMETERS:
            why = f"{err}; " if err else ""
            raise UnsupportedModelError(
                f"{cls.__name__}: a tiny instance cannot be built from config.json ({why}with "
                f"the sizes it needs it has {size / 1e6:.0f}M parameters); this family needs a "
                "table."
            ) from err
        try:
            model = _runs(_build(cls, small), small)
            return model, small, prompt(model, small) if prompt else None
        except UnsupportedModelError:
            raise
        except Exception as error:
            err = error
            if not changed:
                raise UnsupportedModelError(
                    f"{cls.__name__}: a tiny instance cannot be built from config.json ({err})."
                ) from err
            for path in changed.pop(0):
                _put_back(small, config, path)


#: The most parameters an instance may have once sizes are put back (float64: 12 GB): not a
#: target but a guard against building the model at full size (a put-back width and
#: vocabulary); Bamba's default config needs 1.26B (its Mamba heads fix the width).
_MAX_PARAMETERS = 1_500_000_000


def _size(cls, small: dict) -> int:
    """The instance's parameter count, counted on the meta device (nothing allocated)."""
    import torch

    try:
        conf = cls.config_class.from_dict(
            {k: _floats(v) for k, v in small.items() if k != "architectures"}
        )
        with torch.device("meta"):
            model = cls._from_config(conf)
    except Exception:  # the build itself says what is wrong
        return 0
    return sum(p.numel() for p in model.parameters())


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
