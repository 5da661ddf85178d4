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
        description="Axis of the tensor along which d_model lies: 0 for nn.Linear [d_model, in], "
        "1 for embeddings and Conv1D [in, d_model]; with fused experts, 1 for [experts, "
        "d_model, in] and 2 for [experts, in, d_model].",
    )
    fused: bool = Field(
        default=False,
        description="Every expert's output projection in one 3-D tensor (its bias, if any, "
        "[experts, d_model]); the module sums the routed experts' outputs.",
    )
    bias: str | None = Field(
        default=None, description="Bias template; edited when present on disk."
    )
    module: str = Field(description="Module path whose output is this writer's contribution.")
    post_norm: PostNorm | None = None
    outer_norms: list[PostNorm] = Field(
        default_factory=list,
        description="RMSNorms applied after post_norm, innermost first, typically to a sum of "
        "sublayer outputs (Gemma 4's MoE block: post_feedforward_layernorm(norm1(mlp) + "
        "norm2(experts))). Zero along r stays zero through each of them, so the writer is "
        "projected against the product of all the gains times r.",
    )
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
    when: str | None = Field(
        default=None,
        description="Only in layers where this tensor (a template) exists: the same tensor is "
        "listed twice when a layer's other tensors change what follows it (Gemma 4's MLP goes "
        "through two norms in mixture-of-experts layers, one in dense ones).",
    )
    unless: str | None = Field(
        default=None,
        description="Only in layers where this tensor (a template) does not exist (Nemotron-H's "
        "experts write into a latent space, not the residual, where fc2_latent_proj exists).",
    )

    @model_validator(mode="after")
    def _templates(self) -> Writer:
        layered = self.site != "embed"
        expert = self.experts is not None
        if expert and self.site != "mlp":
            raise ValueError("only mlp writers can be experts")
        if self.fused and (self.site != "mlp" or expert or self.axis == 0):
            raise ValueError("fused experts are an mlp writer, d_model on axis 1 or 2, no {expert}")
        if self.axis == 2 and not self.fused:
            raise ValueError("axis 2 is for experts fused in one 3-D tensor (fused: true)")
        _check_template(self.tensor, layered=layered, expert=expert)
        _check_template(self.module, layered=layered)
        if self.bias is not None:
            _check_template(self.bias, layered=layered, expert=expert)
        for condition in (self.when, self.unless):
            if condition is not None:
                _check_template(condition, layered=layered)
        for norm in self.norms:
            if not layered:
                raise ValueError("an embedding cannot have a post-norm")
            _check_template(norm.tensor, layered=True)
            _check_template(norm.module, layered=True)
        return self

    @property
    def norms(self) -> list[PostNorm]:
        """Every norm between the writer's output and the residual add, innermost first."""
        return ([self.post_norm] if self.post_norm else []) + list(self.outer_norms)


class Blocks(_Strict):
    """Module paths of a decoder block, its residual branches (for run-time ablation) and the
    final norm (whose input is the last residual state)."""

    module: str
    attn: list[str] = Field(
        description="Token-mixing branches: every module whose output is added to the residual "
        "stream (self-attention; linear-attention, Mamba or convolution mixers in hybrid "
        "models). A layer has at least one of them."
    )
    mlp: list[str] = Field(description="Channel-mixing branches (MLP, mixture of experts).")
    final_norm: str = Field(description="Module path of the norm after the last block.")

    @field_validator("attn", "mlp", mode="before")
    @classmethod
    def _listed(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("module")
    @classmethod
    def _layered(cls, value: str) -> str:
        return _check_template(value, layered=True)

    @field_validator("attn", "mlp")
    @classmethod
    def _all_layered(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one module path template")
        return [_check_template(v, layered=True) for v in value]

    @field_validator("final_norm")
    @classmethod
    def _unlayered(cls, value: str) -> str:
        return _check_template(value, layered=False)


class Unembed(_Strict):
    tensor: str = Field(description="Unembedding weight name on disk (absent when tied).")
    module: str
    tied_to: str = Field(description="The embedding tensor it shares storage with when tied.")


class ConfigKeys(_Strict):
    """Where config.json keeps the model's size, so that apply never needs transformers.

    Keys are dotted paths (``text_config.hidden_size`` in multimodal checkpoints, whose
    language model's config is nested)."""

    hidden_size: str = "hidden_size"
    num_layers: list[str] = Field(
        default=["num_hidden_layers"],
        description="Where the number of blocks is: the first of these paths present; a list "
        "or string of per-block kinds (Nemotron-H's layers_block_type, "
        "hybrid_override_pattern) counts by its length.",
    )

    @field_validator("num_layers", mode="before")
    @classmethod
    def _paths(cls, value):
        return [value] if isinstance(value, str) else value

    tie: str = Field(
        default="tie_word_embeddings",
        description="The tie_word_embeddings that transformers obeys for the class config.json "
        "names: the top level's for most multimodal wrappers, text_config's for Llama 4's.",
    )
    tie_default: bool = Field(
        description="That key's value when config.json omits it (the config class default)."
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
        description="Leading name prefixes spelled otherwise in some checkpoints: GPT-2's "
        "'transformer.' omitted, multimodal checkpoints' 'language_model.model.' for "
        "'model.language_model.'. Each tensor is looked up under its own name first.",
    )
    writers: list[Writer] = Field(min_length=3)
    mixers: Literal["each", "one"] = Field(
        default="each",
        description="each: every block has a writer of every site; one: every block has a "
        "single mixer, a token mixer (attn) or a channel mixer (mlp), as Nemotron-H's.",
    )
    blocks: Blocks
    unembed: Unembed
    unsupported_architectures: dict[str, str] = Field(
        default_factory=dict, description="Architecture name -> why it is refused."
    )
    derived: bool = Field(
        default=False,
        description="Read off a tiny instance of the class (model/derive.py), not reviewed; "
        "never set in a shipped table.",
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
        return any(w.norms for w in self.writers)

    def experts(self, writer: Writer, config: dict) -> int:
        """How many experts a per-expert writer has, from config.json."""
        key = next((k for k in writer.experts if config_value(config, k) is not None), None)
        try:
            n = int(config_value(config, key))
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
        layers = next(
            (v for k in keys.num_layers if (v := config_value(config, k)) is not None), None
        )
        if isinstance(layers, list | str):
            layers = len(layers)
        try:
            d_model, n_layers = int(config_value(config, keys.hidden_size)), int(layers)
        except (TypeError, ValueError):
            raise UnsupportedModelError(
                f"config.json lacks a valid {keys.hidden_size} or "
                f"{' or '.join(keys.num_layers)} for a {self.family} model."
            ) from None
        tied = config_value(config, keys.tie)
        return d_model, n_layers, bool(keys.tie_default if tied is None else tied)


def config_value(config: dict, path: str | None):
    """The value at a dotted ``path`` of config.json (None where absent)."""
    value = config
    for key in (path or "").split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


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
