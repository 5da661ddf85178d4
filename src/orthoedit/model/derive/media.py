"""A multimodal wrapper's media prompt: one image (and one audio clip where the config has an
audio tower) between text tokens, for the tiny instance (model/derive).

How a class takes an image is its own convention, read off the arguments of its
``get_image_features`` (what its processor would return); the sizes come from the tower's
config, and the number of placeholder tokens from the features the model itself makes. A
class whose convention is none of these is refused by name: derivation cannot show it an
image, so it cannot see what the projector writes.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

from ...errors import UnsupportedModelError
from .instance import special_ids, text_part

#: Placeholder token id keys, per kind of media; ``mm_token_type_ids`` marks each kind so.
_PLACEHOLDER = {"image": ("image_token_id", "image_token_index"),
                "audio": ("audio_token_id", "audio_token_index")}  # fmt: skip
_TYPE_ID = {"image": 1, "audio": 3}
_AUDIO_FRAMES = 16


@dataclass
class Media:
    """A forward call with media, and where each kind's placeholder tokens are."""

    call: dict
    positions: dict = field(default_factory=dict)  # kind -> LongTensor of positions (batch 1)
    dtype: str = "float64"  # float32 where a tower runs in no other (Gemma 4's audio)

    def cast(self, dtype) -> dict:
        """The call with its float inputs in ``dtype``."""
        return _cast(self.call, dtype)


def _owner(model, method: str):
    """The module of the instance that has ``method`` (the wrapper, or its inner model)."""
    return next((m for m in model.modules() if callable(getattr(m, method, None))), None)


def _names(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _image_inputs(model, names: set[str], gen) -> dict:
    """Pixel inputs in the convention of ``get_image_features``' arguments, sized by the
    vision config, for a handful of image tokens."""
    import torch

    vc, top = model.config.vision_config, model.config
    ch = getattr(vc, "num_channels", None) or getattr(vc, "in_channels", 3)
    p = vc.patch_size
    if "image_grid_thw" in names:  # Qwen: flattened patches and their (t, h, w) grid
        side, t = 2 * vc.spatial_merge_size, vc.temporal_patch_size
        return {"pixel_values": torch.randn(side * side, ch * t * p * p, generator=gen),
                "image_grid_thw": torch.tensor([[1, side, side]])}  # fmt: skip
    if "spatial_shapes" in names:  # NaFlex: patches padded to num_patches, a mask, a shape
        n = vc.num_patches
        side = math.isqrt(n)
        return {"pixel_values": torch.randn(1, n, ch * p * p, generator=gen),
                "spatial_shapes": torch.tensor([[side, side]]),
                "pixel_attention_mask": torch.ones(1, n, dtype=torch.long)}  # fmt: skip
    if "image_position_ids" in names:  # patches with their (x, y), pooled by a kernel
        side = 2 * vc.pooling_kernel_size
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"))
        return {"pixel_values": torch.rand(1, side * side, ch * p * p, generator=gen),
                "image_position_ids": grid.permute(1, 2, 0).reshape(1, -1, 2)}  # fmt: skip
    if "image_sizes" in names:  # Pixtral: any size, patches merged by spatial_merge_size
        side = min(2 * p * (getattr(top, "spatial_merge_size", None) or 1), vc.image_size)
        return {"pixel_values": torch.randn(1, ch, side, side, generator=gen),
                "image_sizes": torch.tensor([[side, side]])}  # fmt: skip
    if names - {"self", "pixel_values", "kwargs"} - _OPTIONAL:
        raise UnsupportedModelError(
            f"{type(model).__name__}: derivation cannot build an image for it (get_image_features "
            f"takes {', '.join(sorted(names - {'self', 'kwargs'}))}); this family needs a table."
        )
    side = vc.image_size
    return {"pixel_values": torch.randn(1, ch, side, side, generator=gen)}


#: Arguments of get_image_features that have defaults from the config.
_OPTIONAL = {"vision_feature_layer", "vision_feature_select_strategy"}


def _audio_inputs(model, config: dict, names: set[str], gen) -> dict:
    """Log-mel features as the model type's feature extractor makes them (its feature size)."""
    import torch
    import transformers
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

    extractor = FEATURE_EXTRACTOR_MAPPING_NAMES.get(config.get("model_type"))
    if "input_features_mask" not in names or extractor is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: derivation cannot build an audio clip for it "
            f"(get_audio_features takes {', '.join(sorted(names - {'self', 'kwargs'}))}); this "
            "family needs a table."
        )
    size = getattr(transformers, extractor)().feature_size
    return {"input_features": torch.randn(1, _AUDIO_FRAMES, size, generator=gen),
            "input_features_mask": torch.ones(1, _AUDIO_FRAMES, dtype=torch.bool)}  # fmt: skip


def _rows(features, d: int) -> int:
    """How many d-wide rows ``get_*_features`` made (placeholder tokens needed)."""
    import torch

    out = getattr(features, "pooler_output", features)
    if torch.is_tensor(out):
        return out.reshape(-1, d).shape[0]
    return sum(_rows(o, d) for o in out)


def _placeholder(config: dict, kind: str) -> int:
    for key in _PLACEHOLDER[kind]:
        for part in (config, text_part(config)):
            if isinstance(part.get(key), int):
                return part[key]
    raise UnsupportedModelError(
        f"config.json names no {' or '.join(_PLACEHOLDER[kind])}: where the {kind} tokens go is "
        "unknown, so derivation cannot show the model one."
    )


def _parts(model, config: dict, gen) -> list[tuple[str, dict, int]]:
    """(kind, inputs, placeholder count) for each tower the config has."""
    import torch

    d = model.get_input_embeddings().weight.shape[1]
    parts = []
    for kind, key in (("image", "vision_config"), ("audio", "audio_config")):
        if not isinstance(config.get(key), dict):
            continue
        method = f"get_{kind}_features"
        owner = _owner(model, method)
        if owner is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has a {key} but no {method}: derivation cannot see "
                f"what writes its {kind} tokens' embeddings; this family needs a table."
            )
        names = _names(getattr(owner, method))
        if kind == "image":
            inputs = _image_inputs(model, names, gen)
        else:
            inputs = _audio_inputs(model, config, names, gen)
        dtype = next(owner.parameters()).dtype
        with torch.no_grad():
            features = getattr(owner, method)(**_cast(inputs, dtype))
        parts.append((kind, inputs, _rows(features, d)))
    return parts


def _cast(inputs: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def media_prompt(model, config: dict) -> Media | None:
    """The instance's media prompt (None for a model without towers), checked to run."""
    import torch

    gen = torch.Generator().manual_seed(7)
    parts = _parts(model, config, gen)
    if not parts:
        return None
    vocab = model.get_input_embeddings().weight.shape[0]
    avoid = torch.tensor(sorted(special_ids(config)) or [-1])
    text = torch.randint(3, vocab, (1, 4 * len(parts) + 3), generator=gen)
    text[torch.isin(text, avoid)] = 3
    pieces, call, kinds, at = [text[:, :3]], {}, {}, 3
    for i, (kind, inputs, n) in enumerate(parts):
        pieces += [torch.full((1, n), _placeholder(config, kind)), text[:, 3 + 4 * i : 7 + 4 * i]]
        kinds[kind], at = torch.arange(at, at + n), at + n + 4
        call |= inputs
    ids = torch.cat(pieces, dim=1)
    call["input_ids"] = ids
    forward = _names(type(model).forward)
    types = torch.zeros_like(ids)
    for kind, where in kinds.items():
        types[0, where] = _TYPE_ID[kind]
    if "mm_token_type_ids" in forward:
        call["mm_token_type_ids"] = types
    if "token_type_ids" in forward:
        call["token_type_ids"] = (types == 1).long()
    return _checked(model, Media(call, kinds))


def _checked(model, media: Media) -> Media:
    """``media`` once the instance runs it; in float32 where the class runs it in no other
    (a tower that computes in float32 whatever the model's dtype)."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        model(**media.cast(dtype))
        if dtype != torch.float64:
            try:
                model.to(torch.float64)(**media.cast(torch.float64))
            except RuntimeError:
                media.dtype = "float32"
            finally:
                model.to(dtype)
    return media
