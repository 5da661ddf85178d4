"""Loading and validating the direction to ablate.

Formats: ``.safetensors`` with a float32 tensor named ``direction`` (string metadata in the
header, optional ``direction.json`` beside it), ``.pt`` (``weights_only=True``) and ``.npy``.
The header's ``kind`` says what a 2-D tensor means: ``per-layer`` (the default for 2-D), a
``[n_layers, d_model]`` stack (row i = input of block i) from which one row is picked, or whose
rows apply each to its own layer (``apply --per-layer``); ``span``, ``[k, d_model]`` vectors
whose whole span ``apply`` projects out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import BadInputError
from ..folders import MeasureFolder
from .checkpoint import save_stable

KINDS = ("single", "per-layer", "span")


@dataclass(frozen=True)
class Direction:
    vector: np.ndarray  # [d_model] (or [k, d_model] / [n_layers, d_model]), float64, raw
    path: Path
    sha256: str
    kind: str
    row: int | None = None  # the per-layer row picked, if any
    metadata: dict = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path) -> tuple[np.ndarray, dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            with safe_open(str(path), framework="np") as f:
                if "direction" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    raise BadInputError(
                        f"{path}: no tensor named 'direction' (found: {', '.join(f.keys())})."
                    )
                return f.get_tensor("direction"), dict(f.metadata() or {})
        if suffix == ".pt":
            import torch  # only .pt directions need torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "direction" in obj:
                obj = obj["direction"]
            if not isinstance(obj, torch.Tensor):
                raise BadInputError(f"{path}: expected a tensor, found {type(obj).__name__}.")
            if not obj.is_floating_point():
                raise BadInputError(f"{path}: direction must be floating point, got {obj.dtype}.")
            return obj.detach().cpu().to(torch.float64).numpy(), {}
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), {}
    except BadInputError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise BadInputError(f"{path}: cannot read direction ({err}).") from err
    raise BadInputError(f"{path}: unknown direction format; use .safetensors, .pt or .npy.")


def _read_checked(path: Path) -> tuple[np.ndarray, dict, str]:
    """The tensor, its metadata (``direction.json`` beside it merged in) and its kind."""
    if not path.is_file():
        raise BadInputError(f"direction file {path} does not exist.")
    tensor, metadata = _read(path)
    record = MeasureFolder.of(path).read_record()  # measure's record, beside its direction
    if record is not None:
        metadata = {**record, **metadata}
    if not np.issubdtype(tensor.dtype, np.floating):
        raise BadInputError(f"{path}: direction must be floating point, got {tensor.dtype}.")
    kind = str(metadata.get("kind", "single" if tensor.ndim == 1 else "per-layer"))
    if kind not in KINDS:
        raise BadInputError(f"{path}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if tensor.ndim not in (1, 2):
        raise BadInputError(
            f"{path}: direction must be [d_model], [k, d_model] or [n_layers, d_model], "
            f"got {tuple(tensor.shape)}."
        )
    return tensor, metadata, kind


def _checked_vectors(path: Path, tensor: np.ndarray, d_model: int) -> np.ndarray:
    if tensor.shape[-1] != d_model:
        raise BadInputError(
            f"{path}: direction has size {tensor.shape[-1]}, the model's hidden size is {d_model}."
        )
    vector = tensor.astype(np.float64)
    if not np.isfinite(vector).all():
        raise BadInputError(f"{path}: direction contains NaN or Inf values.")
    if not np.all(np.any(vector, axis=-1)):
        raise BadInputError(f"{path}: direction has zero norm.")
    return vector


def load_direction(
    path: str | Path,
    d_model: int,
    n_layers: int,
    layer: int | None = None,
    *,
    per_layer: bool = False,
    span: bool = False,
) -> Direction:
    """Load, pick a row if needed, and validate against the model's width.

    By default the result is one vector ``[d_model]``. ``span=True`` also accepts a
    ``[k, d_model]`` span file (vector ``[k, d_model]``); ``per_layer=True`` keeps a whole
    per-layer stack (vector ``[n_layers, d_model]``) instead of picking one row.
    """
    path = Path(path)
    tensor, metadata, kind = _read_checked(path)
    return _direction(path, tensor, metadata, kind, d_model, n_layers, layer, per_layer, span)


def _direction(
    path: Path,
    tensor: np.ndarray,
    metadata: dict,
    kind: str,
    d_model: int,
    n_layers: int,
    layer: int | None,
    per_layer: bool,
    span: bool,
) -> Direction:
    """``load_direction`` on a tensor already read (see there)."""
    row = None
    if tensor.ndim == 1:
        if layer is not None:
            raise BadInputError(f"--direction-layer given but {path} holds a single direction.")
        if per_layer:
            raise BadInputError(f"--per-layer given but {path} holds a single direction.")
        kind = "single"
    elif kind == "span":
        if not span:
            raise BadInputError(
                f"{path}: holds a span of {tensor.shape[0]} directions; this command takes one "
                "direction (orthoedit apply takes spans)."
            )
        if layer is not None or per_layer:
            raise BadInputError(
                f"{path}: a span is used whole at every layer; drop --direction-layer/--per-layer."
            )
    else:
        if tensor.shape[0] != n_layers:
            raise BadInputError(
                f"{path}: per-layer direction has {tensor.shape[0]} rows, the model has "
                f"{n_layers} layers."
            )
        if layer is not None and per_layer:
            raise BadInputError("--direction-layer and --per-layer exclude each other.")
        if layer is None and not per_layer:
            raise BadInputError(
                f"{path}: holds one direction per layer; choose one with --direction-layer N"
                + (", or use each layer's own with --per-layer." if span else ".")
            )
        if layer is not None:
            if not 0 <= layer < n_layers:
                raise BadInputError(f"--direction-layer {layer} is outside 0..{n_layers - 1}.")
            tensor, row, kind = tensor[layer], layer, "single"
    vector = _checked_vectors(path, tensor, d_model)
    return Direction(vector, path, sha256_file(path), kind, row, metadata)


def orthonormal(vectors: np.ndarray, what: str = "the directions") -> np.ndarray:
    """An orthonormal basis ``[k, d]`` of the rows of ``vectors`` (Gram-Schmidt, twice, in
    float64, in row order: one vector gives exactly ``v / ‖v‖``). Rows that are (numerically)
    in the span of the rows before them are an error, not silently dropped."""
    rows = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    basis: list[np.ndarray] = []
    for i, v in enumerate(rows):
        w = v.copy()
        if basis:
            q = np.stack(basis)
            for _ in range(2):  # the second pass removes what rounding left of the first
                w -= (q @ w) @ q
        norm = float(np.linalg.norm(w))
        if not norm > 1e-6 * float(np.linalg.norm(v)):
            raise BadInputError(
                f"{what} are linearly dependent: vector {i + 1} lies in the span of the ones "
                "before it; drop it."
            )
        basis.append(w / norm)
    return np.stack(basis)


@dataclass(frozen=True)
class DirectionSet:
    """What an edit projects out, per layer: the span of every shared vector (single and span
    files: every layer and the embedding) and, from each per-layer file, that layer's own row
    (block i uses row i, the embedding row 0)."""

    shared: np.ndarray  # [k, d_model], float64, as loaded (not normalized)
    per_layer: np.ndarray  # [m, n_layers, d_model]
    sources: tuple[Direction, ...]

    @classmethod
    def of(cls, *directions: Direction) -> DirectionSet:
        shared = [
            d.vector.reshape(-1, d.vector.shape[-1]) for d in directions if d.kind != "per-layer"
        ]
        stacks = [d.vector for d in directions if d.kind == "per-layer"]
        d_model = directions[0].vector.shape[-1]
        n_layers = stacks[0].shape[0] if stacks else 0
        return cls(
            np.concatenate(shared) if shared else np.zeros((0, d_model)),
            np.stack(stacks) if stacks else np.zeros((0, n_layers, d_model)),
            tuple(directions),
        )

    def vectors(self, layer: int | None) -> np.ndarray:
        """The vectors projected out of writers of block ``layer`` (None: the embedding)."""
        if not self.per_layer.shape[0]:
            return self.shared
        return np.concatenate([self.shared, self.per_layer[:, 0 if layer is None else layer]])


def load_directions(
    paths: list[Path], d_model: int, n_layers: int, layer: int | None, per_layer: bool
) -> DirectionSet:
    """Every ``--direction`` of apply, checked together: their span is projected out
    (orthonormalized; linearly dependent vectors are an error)."""
    if not paths:
        raise BadInputError("give at least one --direction.")
    if layer is not None and per_layer:
        raise BadInputError("--direction-layer and --per-layer exclude each other.")
    directions = []
    for path in map(Path, paths):
        tensor, metadata, kind = _read_checked(path)
        stack = tensor.ndim == 2 and kind != "span"  # a per-layer file: row or --per-layer
        directions.append(
            _direction(
                path,
                tensor,
                metadata,
                kind,
                d_model,
                n_layers,
                layer if stack else None,
                per_layer and stack,
                span=True,
            )
        )
    if per_layer and not any(d.kind == "per-layer" for d in directions):
        raise BadInputError("--per-layer given but no --direction holds one direction per layer.")
    if layer is not None and not any(d.row is not None for d in directions):
        raise BadInputError("--direction-layer given but no --direction holds one per layer.")
    found_set = DirectionSet.of(*directions)
    for i in range(n_layers if found_set.per_layer.shape[0] else 1):
        orthonormal(found_set.vectors(i), f"the vectors of {', '.join(str(p) for p in paths)}")
    return found_set


def save_direction(path: str | Path, vector, metadata: dict | None = None) -> Path:
    """Write a direction artifact (float32 tensor 'direction' + string metadata).

    ``vector``: a numpy array or a torch tensor, [d_model] or [n_layers, d_model].
    """
    if hasattr(vector, "detach"):  # a torch tensor
        vector = vector.detach().cpu().double().numpy()
    vector = np.asarray(vector)

    path = Path(path)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("kind", "single" if vector.ndim == 1 else "per-layer")
    save_stable({"direction": np.ascontiguousarray(vector, dtype=np.float32)}, path, meta)
    return path


def harmless_mean(direction: Direction, path: Path | None, d_model: int, n_layers: int):
    """The harmless mean activation for ``--method biprojected``, and where it came from: the
    file given (any format ``--direction`` takes), else measure's ``candidates.safetensors``
    beside the direction, at the direction's layer and position."""
    if path is not None:
        mean = load_direction(path, d_model, n_layers)
        return mean.vector, f"{Path(path).name} (sha256 {mean.sha256[:16]})"
    measured = MeasureFolder.of(direction.path)
    candidates = measured.candidates
    layer, position = direction.metadata.get("layer"), direction.metadata.get("position")
    if not candidates.is_file() or layer is None or position is None:
        raise BadInputError(
            "--method biprojected needs the harmless mean: pass --harmless-mean FILE, or use a "
            f"direction written by orthoedit measure (its {candidates.name} beside it)."
        )
    layer, position = int(layer), int(position)
    vector = measured.read_harmless_mean(layer, position, d_model)
    return vector, f"{candidates.name} (layer {layer}, position {position})"


def biproject(r: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, float]:
    """r with its component along the harmless mean removed, and the cosine it had."""
    m = mean / np.linalg.norm(mean)
    along = float(r @ m)
    out = r - along * m
    if not np.linalg.norm(out) > 1e-9 * np.linalg.norm(r):
        raise BadInputError("the direction is parallel to the harmless mean; nothing is left.")
    return out, along / float(np.linalg.norm(r))
