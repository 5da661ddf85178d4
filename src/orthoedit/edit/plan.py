"""Plan, then execute (docs/design.md §5): tensor name -> projection, built per (site, layer).

The plan is data. ``apply`` executes it on the checkpoint's bytes, ``verify`` applies it at
run time with hooks, tests inspect it, and ``--dry-run`` prints it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import __version__
from ..errors import BadInputError, UnsupportedModelError
from ..model.architectures import SITES, ArchitectureTable, Site, TiedPolicy, Writer
from ..model.checkpoint import DTYPES, Checkpoint
from ..model.direction import Direction, DirectionSet, orthonormal
from .ortho import post_norm_unit, unit
from .scope import parse_layers

PLAN_NAME = "plan.json"


Method = Literal["project", "norm-preserving", "biprojected"]


class NormRef(BaseModel):
    """A norm after a writer's post-norm (``ArchitectureTable`` ``outer_norms``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: str = Field(description="Norm weight on disk.")
    offset: float = Field(description="Gain = offset + weight.")
    module: str


class EditOp(BaseModel):
    """Project one tensor: ``W -= scale · u uᵀ W`` along ``axis``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: str = Field(description="Tensor name on disk.")
    site: Site
    layer: int | None = Field(description="Decoder block; None for embeddings.")
    axis: int = Field(description="Residual axis of the tensor.")
    scale: float = Field(ge=0.0, le=1.0)
    module: str = Field(description="Module whose output this tensor produces (hook point).")
    norm: str | None = Field(default=None, description="Post-norm weight: u ∝ (offset+g) ⊙ r.")
    norm_offset: float = 0.0
    norm_module: str | None = None
    outer_norms: list[NormRef] = Field(
        default_factory=list,
        description="Norms after the post-norm, innermost first: u ∝ (product of gains) ⊙ r.",
    )
    scales: str | None = Field(default=None, description="Scale tensor of a quantized weight.")

    @property
    def vector_label(self) -> str:
        return "r" if not self.norm_tensors else f"u({' · '.join(self.norm_tensors)})"

    @property
    def norm_tensors(self) -> list[str]:
        """Every norm weight between this writer and the residual add, innermost first."""
        return ([self.norm] if self.norm else []) + [n.tensor for n in self.outer_norms]

    @property
    def contribution_module(self) -> str:
        """The module whose output is this writer's contribution as added to the residual
        stream: the outermost norm, or the writer's own module."""
        if self.outer_norms:
            return self.outer_norms[-1].module
        return self.norm_module or self.module

    def gain(self, checkpoint: Checkpoint) -> np.ndarray | None:
        """The product of the gains of every norm after this writer, in float64 (None for a
        writer added directly)."""
        norms = [(self.norm, self.norm_offset)] if self.norm else []
        norms += [(n.tensor, n.offset) for n in self.outer_norms]
        gain = None
        for tensor, offset in norms:
            g = np.asarray(checkpoint.read(tensor), dtype=np.float64) + offset
            gain = g if gain is None else gain * g
        return gain


class DirectionFile(BaseModel):
    """One ``--direction`` the plan was built from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(description="File name as given.")
    sha256: str
    kind: Literal["single", "per-layer", "span"] = Field(
        description="single: one vector; per-layer: one row per block; span: k vectors."
    )
    row: int | None = Field(default=None, description="The row picked from a per-layer file.")


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    orthoedit_version: str = __version__
    source: str = Field(description="Model as given: Hub id or local folder.")
    revision: str | None = None
    base_model: str | None = Field(default=None, description="Hub id recorded in the card.")
    family: str
    derived: bool = Field(
        default=False,
        description="The family's table was derived from its transformers class on a tiny "
        "instance (model/derive.py), not a shipped, reviewed one.",
    )
    d_model: int
    n_layers: int
    directions: list[list[float]] = Field(
        description="[k, d_model] vectors as loaded (not normalized), projected out of every "
        "edited writer: their span, orthonormalized in order."
    )
    per_layer_directions: list[list[list[float]]] = Field(
        default_factory=list,
        description="[m, n_layers, d_model]: row i joins the span for block i's writers, row 0 "
        "for the embedding (apply --per-layer).",
    )
    direction_files: list[DirectionFile]
    sites: list[Site]
    layers: tuple[int, int] = Field(description="Half-open range of decoder blocks edited.")
    scales: dict[str, float] = Field(description="'site' or 'site:layer' -> scale actually used.")
    tied: bool = Field(description="Source has tie_word_embeddings set.")
    tied_policy: TiedPolicy | None = Field(description="Policy used when tied, else None.")
    write_lm_head: bool = Field(description="untie: add lm_head.weight = original embedding.")
    unembed_module: str
    unembed_tensor: str
    tied_embedding: str = Field(description="Embedding tensor the unembedding is tied to.")
    ops: list[EditOp]
    warnings: list[str] = Field(default_factory=list)
    method: Method = Field(
        default="project", description="project, norm-preserving or biprojected."
    )
    method_details: dict = Field(
        default_factory=dict, description="e.g. the harmless mean a biprojection used."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_direction(cls, data):
        """Plans written before several directions: one ``direction`` and its file fields."""
        if isinstance(data, dict) and "direction" in data and "directions" not in data:
            data = dict(data)
            data["directions"] = [data.pop("direction")]
            data["direction_files"] = [
                {
                    "file": data.pop("direction_file"),
                    "sha256": data.pop("direction_sha256"),
                    "kind": "single",
                    "row": data.pop("direction_row", None),
                }
            ]
        return data

    @property
    def exact(self) -> bool:
        """Equal to run-time ablation by construction (norm-preserving rescales writers)."""
        return self.method != "norm-preserving"

    @property
    def single(self) -> bool:
        """One direction at every layer (no span, no per-layer rows)."""
        return len(self.directions) == 1 and not self.per_layer_directions

    @property
    def shared(self) -> bool:
        """The same span at every layer (no per-layer rows)."""
        return not self.per_layer_directions

    @property
    def r(self) -> np.ndarray:
        """The direction of a single-direction plan."""
        if not self.single:
            raise ValueError("this plan projects out several directions; use plan.basis(layer)")
        return np.asarray(self.directions[0], dtype=np.float64)

    def vectors(self, layer: int | None) -> np.ndarray:
        """``[k, d_model]`` raw vectors projected out of block ``layer``'s writers (None: the
        embedding)."""
        rows = np.asarray(self.directions, dtype=np.float64).reshape(-1, self.d_model)
        if self.per_layer_directions:
            stacks = np.asarray(self.per_layer_directions, dtype=np.float64)
            rows = np.concatenate([rows, stacks[:, 0 if layer is None else layer]])
        return rows

    def basis(self, layer: int | None) -> np.ndarray:
        """Orthonormal ``[k, d_model]`` basis of ``vectors(layer)`` (r̂ for one direction)."""
        return orthonormal(self.vectors(layer))

    @property
    def edited(self) -> set[str]:
        return {op.tensor for op in self.ops}

    @property
    def unembed_projected(self) -> bool:
        """tied + edit: the unembedding reads the edited embedding, i.e. a projected input."""
        return self.tied and self.tied_policy == "edit" and self.tied_embedding in self.edited

    @property
    def full(self) -> bool:
        """Every writer of every layer fully projected, the token embedding included."""
        layers = {op.layer for op in self.ops if op.layer is not None}
        return (
            set(self.sites) == set(SITES)
            and layers == set(range(self.n_layers))
            and self.tied_embedding in self.edited
            and all(op.scale == 1.0 for op in self.ops)
        )

    def save(self, folder: Path) -> Path:
        path = Path(folder) / PLAN_NAME
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> Plan:
        path = Path(folder) / PLAN_NAME
        if not path.is_file():
            raise BadInputError(f"{path} not found: is {folder} an orthoedit output?")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as err:
            raise BadInputError(f"{path}: not a valid plan ({err}).") from err


def unit_vector(op: EditOp, r: np.ndarray, checkpoint: Checkpoint) -> np.ndarray:
    """The unit vector an op projects against for one direction r, in float64 (r̂, or the
    norm-adjusted u)."""
    gain = op.gain(checkpoint)
    if gain is None:
        return unit(r)
    return post_norm_unit(r, gain, 0.0)


def op_basis(op: EditOp, plan: Plan, checkpoint: Checkpoint) -> np.ndarray:
    """The orthonormal ``[k, d_model]`` basis an op projects against, in float64.

    Pre-norm writers: the span of the layer's directions. Post-norm writers (docs/design.md §2):
    the span of ``g ⊙ rⱼ``, since the contribution's component along rⱼ is
    ``(g ⊙ rⱼ)ᵀ y / rms(y)``; with one direction this is ``unit_vector``.
    """
    vectors = plan.vectors(op.layer)
    gain = op.gain(checkpoint)
    if gain is not None:
        vectors = gain * vectors
    seen = " · ".join(op.norm_tensors) or op.tensor
    return orthonormal(vectors, f"the directions seen through {seen}")


class _Names:
    """Map table templates to names on disk. Each name is looked up as the table spells it,
    then with each of the table's prefix aliases (checkpoints that omit GPT-2's
    'transformer.', multimodal checkpoints saved before transformers 5 renamed their nesting);
    a name found nowhere keeps the table's spelling, for the error that names it."""

    def __init__(self, table: ArchitectureTable, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.aliases = table.checkpoint_prefix_aliases

    def __call__(self, template: str, layer: int | None = None, expert: int | None = None) -> str:
        fields = {k: v for k, v in (("layer", layer), ("expert", expert)) if v is not None}
        name = template.format(**fields) if fields else template
        if name in self.checkpoint.tensors:
            return name
        for prefix, aliases in self.aliases.items():
            if name.startswith(prefix):
                for alias in aliases:
                    if alias + name[len(prefix) :] in self.checkpoint.tensors:
                        return alias + name[len(prefix) :]
        return name

    def require(self, name: str, family: str) -> None:
        if name not in self.checkpoint.tensors:
            raise UnsupportedModelError(
                f"tensor {name} expected by the {family} table is missing from the checkpoint; "
                "is config.json's architecture right for these weights?"
            )


def _check_tensor(ckpt: Checkpoint, name: str, axis: int, d_model: int, ndim: int) -> None:
    info = ckpt.tensors[name]
    if info.dtype not in getattr(ckpt, "editable", DTYPES):  # a GGUF decodes every GGML type
        raise UnsupportedModelError(
            f"tensor {name} is stored as {info.dtype}; orthoedit edits float32/float16/bfloat16 "
            "checkpoints only (dequantize FP8/int checkpoints first)."
        )
    if len(info.shape) != ndim or info.shape[axis] != d_model:
        raise UnsupportedModelError(
            f"tensor {name} has shape {list(info.shape)}; expected {ndim}-D with d_model="
            f"{d_model} on axis {axis}. The architecture table does not match these weights."
        )


def _writer_ops(
    writer: Writer,
    layer: int | None,
    scale: float,
    names: _Names,
    table: ArchitectureTable,
    d_model: int,
    config: dict,
) -> list[EditOp]:
    """The ops of one writer in one layer: its weight and bias, for every expert if it has
    experts; none for an optional writer this layer does not have."""
    present = names.checkpoint.tensors
    if writer.optional and names(writer.tensor, layer, 0) not in present:
        return []
    if writer.when is not None and names(writer.when, layer) not in present:
        return []
    if writer.unless is not None and names(writer.unless, layer) in present:
        return []
    if writer.experts is None:
        return _tensor_ops(writer, layer, None, scale, names, table, d_model)
    ops = []
    for expert in range(table.experts(writer, config)):
        ops += _tensor_ops(writer, layer, expert, scale, names, table, d_model)
    return ops


def _tensor_ops(
    writer: Writer,
    layer: int | None,
    expert: int | None,
    scale: float,
    names: _Names,
    table: ArchitectureTable,
    d_model: int,
) -> list[EditOp]:
    weight = names(writer.tensor, layer, expert)
    weight, scales, axis = names.checkpoint.stored(weight, writer.axis)
    names.require(weight, table.family)
    fused = writer.fused  # [experts, d_model, in] or [experts, in, d_model]; bias [experts, d]
    if scales is None:  # quantized weights are checked against their scales
        _check_tensor(names.checkpoint, weight, axis, d_model, ndim=3 if fused else 2)
    common = {
        "site": writer.site,
        "layer": layer,
        "scale": scale,
        "module": writer.module.format(layer=layer) if layer is not None else writer.module,
    }
    refs = []
    for norm in writer.norms:
        tensor = names(norm.tensor, layer)
        names.require(tensor, table.family)
        refs.append(
            NormRef(tensor=tensor, offset=norm.offset, module=norm.module.format(layer=layer))
        )
    if refs:
        first, *outer = refs
        common |= {
            "norm": first.tensor,
            "norm_offset": first.offset,
            "norm_module": first.module,
            "outer_norms": outer,
        }
    ops = [EditOp(tensor=weight, axis=axis, scales=scales, **common)]
    bias = names(writer.bias, layer, expert) if writer.bias else None
    sibling = weight.removesuffix(".weight") + ".bias"
    if sibling in names.checkpoint.tensors and sibling != bias:
        raise UnsupportedModelError(
            f"{sibling} writes into the residual stream but the {table.family} table does not "
            "list it; refusing to leave it unedited."
        )
    if bias is not None and bias in names.checkpoint.tensors:
        axis = 1 if fused else 0
        _check_tensor(names.checkpoint, bias, axis, d_model, ndim=axis + 1)
        ops.append(EditOp(tensor=bias, axis=axis, **common))
    return ops


def _collect_ops(
    table, names, config: dict, sites: list, layers: range, scales: dict, policy: str | None
) -> tuple[list[EditOp], dict[str, float], list[str]]:
    """The ops of every writer at the chosen sites and layers (scale 0 leaves one out), the
    scales used by site key ("embed", "attn:3", ...), and warnings about tied embeddings
    (``policy``: the tied policy, None for untied embeddings)."""
    d_model = table.dims(config)[0]
    skip_tied = policy == "skip"
    warnings: list[str] = []
    ops: list[EditOp] = []
    used: dict[str, float] = {}
    for writer in table.writers:
        if writer.site not in sites:
            continue
        skip = skip_tied and writer.tensor == table.unembed.tied_to
        if writer.site == "embed" and skip:
            warnings.append(
                f"tied embeddings: {names(table.unembed.tied_to)} left unedited "
                f"({table.family} default 'skip': some runtimes force tying for it); "
                "--tied untie|edit changes this."
            )
            continue
        if writer.site == "embed":
            keys = {"embed": None}
        else:
            keys = {f"{writer.site}:{layer}": layer for layer in layers}
        for key, layer in keys.items():
            scale = scales.get(key, 1.0)
            if scale > 0:
                ops += _writer_ops(writer, layer, scale, names, table, d_model, config)
                used[key] = scale
    _check_every_layer_written(ops, used, table)
    if not ops:
        raise BadInputError("the plan edits nothing: check --sites, --layers and --scales.")
    if policy == "edit" and names(table.unembed.tied_to) in {op.tensor for op in ops}:
        warnings.append(
            "tied embeddings edited in place (--tied edit): the unembedding changes too, so the "
            "result is not equivalent to run-time ablation of the residual stream."
        )
    return ops, used, warnings


def _check_every_layer_written(ops: list[EditOp], used: dict[str, float], table) -> None:
    """Optional writers: every edited layer still needs one writer of its site in the
    checkpoint (of either site in a table of one mixer per block), or the table does not
    describe these weights."""
    written = {(op.site, op.layer) for op in ops}
    for key in used:
        site, _, layer = key.partition(":")
        if not layer:
            continue
        sites = ("attn", "mlp") if table.mixers == "one" else (site,)
        if not any((s, int(layer)) in written for s in sites) and _all_sites(used, table):
            raise UnsupportedModelError(
                f"no {site} writer of the {table.family} table exists in layer {layer} of the "
                "checkpoint; is config.json's architecture right for these weights?"
            )


def _all_sites(used: dict[str, float], table) -> bool:
    """Whether both block sites are edited (a table of one mixer per block can only check a
    layer for some writer then)."""
    if table.mixers == "each":
        return True
    return {key.partition(":")[0] for key in used} >= {"attn", "mlp"}


def build_plan(
    *,
    table: ArchitectureTable,
    checkpoint: Checkpoint,
    config: dict,
    direction: Direction | DirectionSet,
    source: str,
    revision: str | None = None,
    base_model: str | None = None,
    sites: list[Site] | None = None,
    layers: str | None = None,
    scales: dict[str, float] | None = None,
    tied_policy: TiedPolicy | None = None,
    method: Method = "project",
    method_details: dict | None = None,
) -> Plan:
    """Turn a table, a checkpoint and options into the list of tensors to project."""
    found = direction if isinstance(direction, DirectionSet) else DirectionSet.of(direction)
    d_model, n_layers, tied = table.dims(config)
    sites = list(dict.fromkeys(sites or SITES))
    start, end = parse_layers(layers, n_layers)
    scales = scales or {}
    names = _Names(table, checkpoint)
    policy = (tied_policy or table.tied_default) if tied else None
    tied_embedding = names(table.unembed.tied_to)
    ops, used, warnings = _collect_ops(
        table, names, config, sites, range(start, end), scales, policy
    )
    unembed = names(table.unembed.tensor)
    return Plan(
        source=source,
        revision=revision,
        base_model=base_model,
        family=table.family,
        derived=table.derived,
        d_model=d_model,
        n_layers=n_layers,
        directions=found.shared.tolist(),
        per_layer_directions=found.per_layer.tolist(),
        direction_files=[
            DirectionFile(file=d.path.name, sha256=d.sha256, kind=d.kind, row=d.row)
            for d in found.sources
        ],
        sites=sites,
        layers=(start, end),
        scales=used,
        tied=tied,
        tied_policy=policy,
        write_lm_head=bool(tied and policy == "untie" and unembed not in checkpoint.tensors),
        unembed_module=table.unembed.module,
        unembed_tensor=unembed,
        tied_embedding=tied_embedding,
        ops=ops,
        warnings=warnings,
        method=method,
        method_details=method_details or {},
    )
