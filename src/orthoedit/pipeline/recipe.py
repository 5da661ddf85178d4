"""Recipes: one YAML file with the options of every stage of a full run.

A recipe's sections are the options of the commands it runs, validated by the same pydantic
models as the CLI; the run fills in what connects the stages (model, paths):

    model: ./my-model              # folder or Hub id (every stage uses it)
    revision: null
    direction: null                # a fixed direction file instead of measuring
    measure: {n_train: 128}        # orthoedit measure options
    search: {trials: 100}          # orthoedit search options (null: skip; the edit then uses
                                   # the chosen trial's direction, scales and sites)
    edit: {sites: [attn, mlp]}     # orthoedit apply options
    verify: {}                     # orthoedit verify options (null: skip)
    bench: {tasks: [mmlu]}         # orthoedit eval bench options (null: skip)
    safety: {judge: hf:...}        # orthoedit eval safety options (null: skip)
    kl: {n: 64}                    # orthoedit eval kl options (null: skip)
    gguf: {types: [Q8_0, Q4_K_M]}  # orthoedit export gguf options (null: skip, the default);
                                   # publish then uploads the files beside the weights
    publish: {repo_id: you/name}   # orthoedit push options (null: skip)

Relative paths in a recipe are relative to the recipe's folder. ``pipeline.run`` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import (
    ApplyConfig,
    EvalBenchConfig,
    EvalKLConfig,
    EvalSafetyConfig,
    ExportGgufConfig,
    MeasureConfig,
    PushConfig,
    SearchConfig,
    VerifyConfig,
)
from ..errors import BadInputError
from ..folders import RunFolder
from ..model.gguf import is_gguf

if TYPE_CHECKING:
    pass

STAGES = ("direction", "search", "model", "verify", "bench", "safety", "kl", "gguf", "publish")
SECTIONS = {
    "measure": (MeasureConfig, {"model", "out", "overwrite", "revision"}),
    "search": (SearchConfig, {"model", "candidates", "out", "overwrite", "revision"}),
    "edit": (ApplyConfig, {"model", "direction", "out", "overwrite", "dry_run", "revision"}),
    "verify": (VerifyConfig, {"source", "edited", "revision", "report", "overwrite"}),
    "bench": (EvalBenchConfig, {"base", "edited", "out", "overwrite"}),
    "safety": (EvalSafetyConfig, {"model", "base", "out", "overwrite"}),
    "kl": (EvalKLConfig, {"base", "edited", "report", "overwrite"}),
    "gguf": (ExportGgufConfig, {"model_dir", "out", "overwrite"}),
    "publish": (PushConfig, {"model_dir", "eval", "gguf"}),
}
# Options that may name a file; a relative one is taken relative to the recipe.
PATH_KEYS = {
    "harmful",
    "harmless",
    "confirm_harmful",
    "confirm_harmless",
    "scales",
    "template",
    "prompts",
    "phrases",
    "llama_cpp",
}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Folder or Hugging Face Hub model id.")
    revision: str | None = None
    direction: str | None = Field(default=None, description="A fixed direction file.")
    measure: dict = Field(default_factory=dict)
    search: dict | None = None
    edit: dict = Field(default_factory=dict)
    verify: dict | None = Field(default_factory=dict)
    bench: dict | None = None
    safety: dict | None = None
    kl: dict | None = None
    gguf: dict | None = None
    publish: dict | None = None


def _local(value, base: Path):
    if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
        return str((base / value).resolve())
    return value


def load_recipe(path: Path) -> tuple[Recipe, Path]:
    """The validated recipe and its folder; any problem is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"recipe {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise BadInputError(
            f"recipe {path}: not valid YAML ({str(err).splitlines()[0]})."
        ) from None
    if not isinstance(data, dict):
        raise BadInputError(f"recipe {path}: expected a mapping of sections.")
    try:
        recipe = Recipe(**data)
    except ValidationError as err:
        raise BadInputError(f"recipe {path}: {_explain(err, Recipe)}") from None
    return recipe, path.parent.resolve()


def _explain(err: ValidationError, model: type[BaseModel], section: str = "") -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in (section, *first["loc"]) if p != "")
    if first["type"] == "extra_forbidden":
        fixed = SECTIONS[section][1] if section in SECTIONS else set()  # set by the run
        allowed = ", ".join(sorted(set(model.model_fields) - fixed))
        return f"unknown key {where!r} (allowed: {allowed})."
    return f"{where}: {first['msg']}."


def stage_configs(recipe: Recipe, base: Path, out: Path) -> dict[str, BaseModel | Path]:
    """Every stage's options, validated now (before anything runs)."""
    if is_gguf(recipe.model):
        raise BadInputError(
            f"recipe: model {recipe.model} is a GGUF; a run edits checkpoint folders (its model "
            "stage is a folder, verified and published as one): run measure, search, apply and "
            "eval on the GGUF one by one."
        )
    filled = _filled(recipe, _local(recipe.model, base), out)
    configs: dict[str, BaseModel | Path] = {}
    for section, (cls, reserved) in SECTIONS.items():
        options = getattr(recipe, section)
        if options is None or (section == "measure" and recipe.direction is not None):
            continue
        clash = sorted(set(options) & reserved)
        if clash:
            raise BadInputError(
                f"recipe: {section}.{clash[0]} is set by the run (from the recipe's model, "
                "revision and the output folder); remove it."
            )
        local = {k: _local(v, base) if k in PATH_KEYS else v for k, v in options.items()}
        judge = local.get("judge")
        if isinstance(judge, str) and judge.startswith("hf:"):
            local["judge"] = "hf:" + _local(judge[3:], base)
        if "overwrite" in cls.model_fields and section != "search":
            # a stage that runs replaces its old output (a search resumes its own study)
            local["overwrite"] = True
        try:
            cfg = cls(**local, **filled[section])
        except ValidationError as err:
            raise BadInputError(f"recipe: {_explain(err, cls, section)}") from None
        configs[_stage_of(section)] = cfg
    if recipe.direction is not None:
        path = Path(_local(recipe.direction, base))
        if not path.is_file():
            raise BadInputError(f"recipe: direction file {path} does not exist.")
        configs["direction"] = path
    return configs


def _filled(recipe: Recipe, model: str, out: Path) -> dict[str, dict]:
    """What the run sets in each section: the model, and the paths that connect the stages
    (with a search, the edit takes the chosen trial's direction and scales)."""
    run = RunFolder(out)
    edited = run.model
    filled = {
        "measure": {"model": model, "out": run.direction.path, "revision": recipe.revision},
        "search": {
            "model": model,
            "candidates": run.direction.path,
            "out": run.search.path,
            "revision": recipe.revision,
        },
        "edit": {
            "model": model,
            "direction": run.direction.direction,
            "out": edited,
            "revision": recipe.revision,
        },
        "verify": {
            "source": model,
            "edited": edited,
            "revision": recipe.revision,
            "report": run.verify,
        },
        "bench": {"base": model, "edited": str(edited), "out": run.bench.path},
        "safety": {"model": str(edited), "base": model, "out": run.safety.path},
        "kl": {"base": model, "edited": str(edited), "report": run.kl},
        "gguf": {"model_dir": edited, "out": run.gguf},
        "publish": {
            "model_dir": edited,
            "eval": out if any(getattr(recipe, s) is not None for s in EVALUATED) else None,
            "gguf": run.gguf if recipe.gguf is not None else None,
        },
    }
    if recipe.search is not None:
        if recipe.direction is not None:
            raise BadInputError(
                "recipe: search needs measure's candidates; remove direction (or search)."
            )
        clash = sorted(set(recipe.edit) & set(SEARCHED))
        if clash:
            raise BadInputError(
                f"recipe: edit.{clash[0]} is set by the search stage (its chosen trial); "
                "remove it, or remove search."
            )
        chosen = run.search.chosen
        filled["edit"] |= {"direction": chosen.direction, "scales": chosen.scales}
    return filled


EVALUATED = ("verify", "bench", "safety", "kl")
#: Options of the edit that a search stage decides.
SEARCHED = ("direction_layer", "per_layer", "sites", "scales")


def _stage_of(section: str) -> str:
    return {"measure": "direction", "edit": "model"}.get(section, section)
