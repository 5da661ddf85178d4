"""Architectures as data: one strictly validated table per family (docs/design.md §1).

A table lists every tensor that writes into the residual stream, by its name on disk, with the
axis along which d_model lies and, for post-norm ("sandwich") models, the norm its output passes
through before the residual add. Module paths for run-time hooks are mapped separately, because
transformers may rename modules relative to the checkpoint. The table is chosen from
config.json (``architectures[0]``, then ``model_type``), never from a repository name.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UnsupportedModelError

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when the wheel has it
Site = Literal["embed", "attn", "mlp"]
SITES: tuple[Site, ...] = ("embed", "attn", "mlp")
TiedPolicy = Literal["untie", "skip", "edit"]

_PLACEHOLDER = re.compile(r"\{(\w*)\}")


def _check_template(value: str, *, layered: bool, expert: bool = False) -> str:
    names = set(_PLACEHOLDER.findall(value))
    allowed = {"layer", "expert"} if expert else {"layer"}
    if names - allowed:
        raise ValueError(f"{value!r}: placeholders allowed here are {sorted(allowed)}, got {names}")
    if expert and "expert" not in names:
        raise ValueError(f"{value!r}: a per-expert template must contain {{expert}}")
    if layered and "layer" not in names:
        raise ValueError(f"{value!r}: a per-layer template must contain {{layer}}")
    if not layered and names:
        raise ValueError(f"{value!r}: this template must not contain {{layer}}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostNorm(_Strict):
    """The RMSNorm a writer's output passes through before the residual add (Gemma 2/3, OLMo 2).

    Its gain is ``offset + weight`` (offset 1.0 for Gemma's ``1 + weight`` convention). Only
    RMSNorm is accepted: a LayerNorm post-norm centres and shifts its input, which no weight
    orthogonalization can make exact, so such a table is rejected rather than guessed.
    """

    kind: Literal["rms"] = Field(description="Norm type; only RMSNorm can be made exact.")
    tensor: str = Field(description="Name template of the norm weight on disk.")
    offset: float = Field(description="Gain = offset + weight (1.0 for Gemma, 0.0 otherwise).")
    module: str = Field(description="Module path of the norm, for contribution-level hooks.")


class Writer(_Strict):
    """One tensor (and optional bias) that adds into the residual stream."""

    site: Site
    tensor: str = Field(
        description="Name template on disk, e.g. model.layers.{layer}.mlp.down_proj.weight"
    )
    axis: int = Field(
        ge=0,
        le=2,
        description="Axis of the tensor along which d_model lies; 2 for experts fused in one "
        "3-D tensor [experts, in, d_model] (its bias is then [experts, d_model]).",
    )
    bias: str | None = Field(
        default=None, description="Bias template; edited when present on disk."
    )
    module: str = Field(description="Module path whose output is this writer's contribution.")
    post_norm: PostNorm | None = None
    experts: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Mixture of experts: the config keys that may hold the number of experts "
        "(the first present is used; transformers renames some on save). The "
        "tensor and bias templates then contain {expert}; the module is the one whose output "
        "sums the routed experts' outputs.",
    )
    optional: bool = Field(
        default=False,
        description="Absent from some layers (dense layers between sparse ones); every layer "
        "still needs one writer of each site.",
    )

    @model_validator(mode="after")
    def _templates(self) -> Writer:
        layered = self.site != "embed"
        expert = self.experts is not None
        if expert and self.site != "mlp":
            raise ValueError("only mlp writers can be experts")
        if self.axis == 2 and (self.site != "mlp" or expert):
            raise ValueError("axis 2 is for mlp experts fused in one 3-D tensor (no {expert})")
        _check_template(self.tensor, layered=layered, expert=expert)
        _check_template(self.module, layered=layered)
        if self.bias is not None:
            _check_template(self.bias, layered=layered, expert=expert)
        if self.post_norm is not None:
            if not layered:
                raise ValueError("an embedding cannot have a post-norm")
            _check_template(self.post_norm.tensor, layered=True)
            _check_template(self.post_norm.module, layered=True)
        return self


class Blocks(_Strict):
    """Module paths of a decoder block and its two residual branches (for run-time ablation)."""

    module: str
    attn: str
    mlp: str

    @field_validator("module", "attn", "mlp")
    @classmethod
    def _layered(cls, value: str) -> str:
        return _check_template(value, layered=True)


class Unembed(_Strict):
    tensor: str = Field(description="Unembedding weight name on disk (absent when tied).")
    module: str
    tied_to: str = Field(description="The embedding tensor it shares storage with when tied.")


class ConfigKeys(_Strict):
    """Where config.json keeps the model's size, so that apply never needs transformers."""

    hidden_size: str = "hidden_size"
    num_layers: str = "num_hidden_layers"
    tie_default: bool = Field(
        description="tie_word_embeddings when config.json omits it (the config class default)."
    )


class ArchitectureTable(_Strict):
    family: str
    description: str
    architectures: list[str] = Field(min_length=1)
    model_types: list[str] = Field(min_length=1)
    config: ConfigKeys
    tied_default: TiedPolicy = Field(description="Policy when tie_word_embeddings is set.")
    tied_reason: str = Field(description="Why this default: shown to users and in the card.")
    checkpoint_prefix_aliases: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Leading name prefixes that some checkpoints omit (GPT-2 'transformer.').",
    )
    writers: list[Writer] = Field(min_length=3)
    blocks: Blocks
    unembed: Unembed
    unsupported_architectures: dict[str, str] = Field(
        default_factory=dict, description="Architecture name -> why it is refused."
    )

    @model_validator(mode="after")
    def _sites_covered(self) -> ArchitectureTable:
        missing = set(SITES) - {w.site for w in self.writers}
        if missing:
            raise ValueError(f"no writer for site(s) {sorted(missing)}")
        if self.unembed.tied_to not in {w.tensor for w in self.writers if w.site == "embed"}:
            raise ValueError(f"unembed.tied_to {self.unembed.tied_to!r} is not an embed writer")
        return self

    @property
    def post_norm(self) -> bool:
        return any(w.post_norm is not None for w in self.writers)

    def experts(self, writer: Writer, config: dict) -> int:
        """How many experts a per-expert writer has, from config.json."""
        key = next((k for k in writer.experts if k in config), None)
        try:
            n = int(config[key])
        except (KeyError, TypeError, ValueError):
            raise UnsupportedModelError(
                f"config.json lacks a valid {' or '.join(writer.experts)} (number of experts) "
                f"for a {self.family} model."
            ) from None
        if n < 1:
            raise UnsupportedModelError(f"config.json: {key} = {n} experts.")
        return n

    def dims(self, config: dict) -> tuple[int, int, bool]:
        """(d_model, n_layers, tied) read from config.json."""
        keys = self.config
        try:
            d_model, n_layers = int(config[keys.hidden_size]), int(config[keys.num_layers])
        except (KeyError, TypeError, ValueError) as err:
            raise UnsupportedModelError(
                f"config.json lacks a valid {err} for a {self.family} model."
            ) from None
        return d_model, n_layers, bool(config.get("tie_word_embeddings", keys.tie_default))


@cache
def load_tables() -> dict[str, ArchitectureTable]:
    """All shipped tables by family name, each validated strictly."""
    tables: dict[str, ArchitectureTable] = {}
    folder = resources.files("orthoedit") / "architectures"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        try:
            table = ArchitectureTable.model_validate(yaml.load(entry.read_text(), Loader=_LOADER))
        except ValidationError as err:  # a broken shipped table is a bug, not user input
            raise RuntimeError(f"architecture table {entry.name} is invalid:\n{err}") from err
        tables[table.family] = table
    return tables


def supported_architectures() -> list[str]:
    return sorted(a for t in load_tables().values() for a in t.architectures)


def table_for_config(config: dict) -> ArchitectureTable:
    """Choose the table from config.json: ``architectures[0]`` first, then ``model_type``."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    model_type = config.get("model_type")
    tables = load_tables().values()
    for table in tables:
        if arch in table.unsupported_architectures:
            raise UnsupportedModelError(f"{arch}: {table.unsupported_architectures[arch]}")
    for table in tables:
        if arch is not None and arch in table.architectures:
            return table
    for table in tables:
        if arch is None and model_type in table.model_types:
            return table
    name = arch or model_type or "unknown"
    raise UnsupportedModelError(
        f"architecture {name!r} is not supported; supported: {', '.join(supported_architectures())}"
    )
