"""Which part of a model an edit covers: the ``--layers`` range and the ``--scales`` file."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInputError
from ..model.architectures import SITES


def parse_layers(spec: str | None, n_layers: int) -> tuple[int, int]:
    """``START:END`` (half-open, Python slice rules, negatives allowed) -> (start, end)."""
    if spec is None or spec.strip() in ("", ":"):
        return 0, n_layers
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else None
        end = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise BadInputError(f"--layers {spec!r}: expected START:END, e.g. 4:20 or 10:.") from None
    outside = [i for i in (start, end) if i is not None and not -n_layers <= i <= n_layers]
    if outside:  # Python would clip them silently: a typo would edit other layers than meant
        raise BadInputError(
            f"--layers {spec!r}: {outside[0]} is outside this {n_layers}-layer model; "
            f"use START:END within -{n_layers}..{n_layers}, e.g. {min(2, n_layers - 1)}:."
        )
    start, end, _ = slice(start, end).indices(n_layers)
    if start >= end:
        raise BadInputError(f"--layers {spec!r} selects no layer of a {n_layers}-layer model.")
    return start, end


def load_scales(path: str | Path | None, n_layers: int) -> dict[str, float]:
    """Read ``--scales FILE.json``: ``{"embed": s, "attn": s | [s per layer] | {"layer": s}}``.

    Returns explicit scales keyed ``"embed"`` and ``"attn:3"``; missing entries mean 1.0.
    """
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInputError(f"--scales {path}: cannot read JSON ({err}).") from err
    if not isinstance(raw, dict) or set(raw) - set(SITES):
        raise BadInputError(f"--scales {path}: expected an object with keys among {SITES}.")
    scales: dict[str, float] = {}
    for site, value in raw.items():
        if site == "embed" or isinstance(value, int | float):
            if not isinstance(value, int | float):
                raise BadInputError(f"--scales {path}: 'embed' takes a single number.")
            entries = {None: value}
        elif isinstance(value, list):
            if len(value) != n_layers:
                raise BadInputError(
                    f"--scales {path}: {site!r} lists {len(value)} scales, the model has "
                    f"{n_layers} layers."
                )
            entries = dict(enumerate(value))
        elif isinstance(value, dict):
            try:
                entries = {int(k): v for k, v in value.items()}
            except ValueError:
                raise BadInputError(f"--scales {path}: layer keys must be integers.") from None
        else:
            raise BadInputError(f"--scales {path}: bad value for {site!r}.")
        for layer, scale in entries.items():
            if not isinstance(scale, int | float) or not 0.0 <= scale <= 1.0:
                raise BadInputError(f"--scales {path}: scales must be numbers in [0, 1].")
            if layer is not None and not 0 <= layer < n_layers:
                raise BadInputError(f"--scales {path}: layer {layer} outside 0..{n_layers - 1}.")
            if layer is None and site != "embed":
                scales.update({f"{site}:{i}": float(scale) for i in range(n_layers)})
            else:
                scales[site if layer is None else f"{site}:{layer}"] = float(scale)
    return scales
