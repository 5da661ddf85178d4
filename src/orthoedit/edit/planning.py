"""The plan of an ``ApplyConfig``'s edit of a checkpoint, safetensors or GGUF: the directions
loaded (biprojected if asked), the scales read, ``build_plan`` called."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..config import ApplyConfig
from ..errors import BadInputError
from ..model.direction import DirectionSet, biproject, harmless_mean, load_directions
from .plan import Plan, build_plan
from .scope import load_scales


def plan_for(cfg: ApplyConfig, table, checkpoint, config: dict, source: str, revision,
             base_model: str | None) -> Plan:  # fmt: skip
    """The plan of ``cfg``'s edit of a checkpoint (safetensors or GGUF)."""
    d_model, n_layers, _ = table.dims(config)
    direction = load_directions(
        cfg.direction, d_model, n_layers, cfg.direction_layer, cfg.per_layer
    )
    details: dict = {}
    if cfg.harmless_mean is not None and cfg.method != "biprojected":
        raise BadInputError("--harmless-mean is for --method biprojected.")
    if cfg.method == "biprojected":
        direction, details = _biprojected(direction, cfg, d_model, n_layers)
    return build_plan(
        table=table,
        checkpoint=checkpoint,
        config=config,
        direction=direction,
        source=source,
        revision=revision,
        base_model=base_model,
        sites=cfg.sites,
        layers=cfg.layers,
        scales=load_scales(cfg.scales, n_layers),
        tied_policy=cfg.tied,
        method=cfg.method,
        method_details=details,
    )


def _biprojected(found: DirectionSet, cfg: ApplyConfig, d_model: int, n_layers: int):
    """Every shared vector made orthogonal to the harmless mean (one mean: per-layer rows
    would each need their own layer's mean, which is not measured per file)."""
    if found.per_layer.shape[0]:
        raise BadInputError(
            "--method biprojected takes single or span directions, not --per-layer ones."
        )
    mean, where = harmless_mean(found.sources[0], cfg.harmless_mean, d_model, n_layers)
    pairs = [biproject(v, mean) for v in found.shared]
    cosines = [round(c, 6) for _, c in pairs]
    shared = np.stack([v for v, _ in pairs])
    details = {
        "harmless_mean": where,
        "cosine_with_harmless_mean": cosines[0] if len(cosines) == 1 else cosines,
    }
    return replace(found, shared=shared), details
