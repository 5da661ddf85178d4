"""The search space of ``orthoedit search``: what a trial chooses (a direction blended between
adjacent layers' candidates, a per-layer weight profile for the attention and MLP outputs, the
embedding on or off), how Optuna suggests it, and how a stored trial's parameters read back.
Read by the search and by its report."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SITES_SEARCHED = ("attn", "mlp")
#: A candidate this much smaller than the largest is empty (the embedding of a template
#: token all prompts share has no difference of means).
EMPTY = 1e-6


@dataclass(frozen=True)
class Profile:
    """A per-layer weight profile: ``peak_weight`` at layer ``peak``, falling off linearly to
    ``edge_frac * peak_weight`` at ``width`` layers away, 0 beyond."""

    peak_weight: float  # [0, 1]
    peak: float  # a layer, [0, n_layers - 1]
    width: float  # layers, > 0
    edge_frac: float  # [0, 1]

    def scales(self, n_layers: int) -> list[float]:
        edge = self.edge_frac * self.peak_weight
        out = []
        for layer in range(n_layers):
            d = abs(layer - self.peak)
            s = (
                0.0
                if d > self.width
                else self.peak_weight - (self.peak_weight - edge) * d / self.width
            )
            out.append(min(1.0, max(0.0, float(s))))
        return out


@dataclass(frozen=True)
class Weights:
    """A free per-layer weight profile (``--profile free``): one weight in [0, 1] per layer."""

    weights: tuple[float, ...]

    def scales(self, n_layers: int) -> list[float]:
        return [float(w) for w in self.weights[:n_layers]]


@dataclass(frozen=True)
class EditParams:
    """One trial's edit: the direction (a float layer and a position offset) and the scales."""

    layer: float
    position: int  # offset from the end of the prompt, -1 = last token
    attn: Profile | Weights
    mlp: Profile | Weights
    embed: bool

    def scales(self, n_layers: int) -> dict[str, float | list[float]]:
        """In the ``--scales`` JSON format of ``apply`` (``plan.load_scales``)."""
        return {
            "embed": 1.0 if self.embed else 0.0,
            "attn": self.attn.scales(n_layers),
            "mlp": self.mlp.scales(n_layers),
        }

    def plan_scales(self, n_layers: int) -> tuple[list[str], dict[str, float]]:
        """The sites with anything to edit, and ``build_plan``'s scales (``"attn:3"``...)."""
        raw = self.scales(n_layers)
        scales = {"embed": raw["embed"]}
        sites = ["embed"] if self.embed else []
        for site in SITES_SEARCHED:
            scales |= {f"{site}:{i}": s for i, s in enumerate(raw[site])}
            if any(s > 0 for s in raw[site]):
                sites.append(site)
        return sites, scales


@dataclass(frozen=True)
class Space:
    """What a search may vary (from ``SearchConfig``; checked against the model by
    ``prepare``): the direction's layer range and positions, the profile kind and the
    embedding choices. Fixed choices are still drawn (a range of one value, one category), so
    every stored trial names all its parameters."""

    layers: tuple[float, float]
    positions: list[int]
    profile: str  # "shape" or "free"
    embed: list[bool]


def suggest(trial, n_layers: int, space: Space) -> EditParams:
    """Draw a trial's parameters (the same names and ranges every trial: a fixed search space,
    as the multivariate sampler needs)."""
    top = float(n_layers - 1)

    def profile(site: str) -> Profile | Weights:
        if space.profile == "free":
            return Weights(
                tuple(trial.suggest_float(f"{site}_weight_{i}", 0.0, 1.0) for i in range(n_layers))
            )
        return Profile(
            peak_weight=trial.suggest_float(f"{site}_peak_weight", 0.0, 1.0),
            peak=trial.suggest_float(f"{site}_peak_layer", 0.0, top),
            width=trial.suggest_float(f"{site}_width", 0.5, float(n_layers)),
            edge_frac=trial.suggest_float(f"{site}_edge_frac", 0.0, 1.0),
        )

    return EditParams(
        layer=trial.suggest_float("direction_layer", *space.layers),
        position=trial.suggest_categorical("position", space.positions),
        attn=profile("attn"),
        mlp=profile("mlp"),
        embed=trial.suggest_categorical("embed", space.embed),
    )


def free_weights(stored: dict, site: str) -> tuple[float, ...] | None:
    """A free profile's weights from a trial's params (``attn_weight_0``, ...), layer by
    layer; None for a shape profile."""
    n = sum(1 for k in stored if k.startswith(f"{site}_weight_"))
    return tuple(stored[f"{site}_weight_{i}"] for i in range(n)) if n else None


def params_of(stored: dict) -> EditParams:
    """``EditParams`` from a stored trial's ``params``."""

    def profile(site: str) -> Profile | Weights:
        free = free_weights(stored, site)
        if free is not None:
            return Weights(free)
        return Profile(
            stored[f"{site}_peak_weight"],
            stored[f"{site}_peak_layer"],
            stored[f"{site}_width"],
            stored[f"{site}_edge_frac"],
        )

    return EditParams(
        stored["direction_layer"],
        int(stored["position"]),
        profile("attn"),
        profile("mlp"),
        bool(stored["embed"]),
    )


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def nonempty(candidates: np.ndarray) -> np.ndarray:
    """``[n_layers, n_pos]``: which candidates have a difference of means."""
    norms = np.linalg.norm(candidates, axis=-1)
    return norms > EMPTY * norms.max()


def blend(candidates: np.ndarray, layer: float, position: int) -> tuple[np.ndarray, dict]:
    """The unit direction at a float ``layer``: the normalized candidates of the two adjacent
    layers at ``position``, mixed linearly and normalized (an empty candidate gives its weight
    to the other side; with both empty, the nearest non-empty layer). Rounded to float32, as
    the direction file stores it, so a trial and the file ``apply`` reads are the same vector.
    Returns the vector and where it came from (layers and weights)."""
    n_layers, n_pos, _ = candidates.shape
    p = n_pos + position
    ok = nonempty(candidates)[:, p]
    lo, hi = math.floor(layer), min(math.ceil(layer), n_layers - 1)
    t = layer - lo
    parts = [(lo, 1.0 - t), (hi, t)] if hi != lo else [(lo, 1.0)]
    parts = [(i, w) for i, w in parts if ok[i] and w > 0]
    if not parts:
        near = min(np.flatnonzero(ok), key=lambda i: (abs(i - layer), i))
        parts = [(int(near), 1.0)]
    total = sum(w for _, w in parts)
    mixed = sum((w / total) * _unit(candidates[i, p]) for i, w in parts)
    if np.linalg.norm(mixed) < 1e-6:  # opposite neighbours cancel out: take the nearer one
        parts = [max(parts, key=lambda part: part[1])]
        total, mixed = parts[0][1], _unit(candidates[parts[0][0], p])
    vector = _unit(mixed).astype(np.float32).astype(np.float64)
    source = {
        "layers": [int(i) for i, _ in parts],
        "weights": [w / total for _, w in parts],
        "position": position,
    }
    return vector, source
