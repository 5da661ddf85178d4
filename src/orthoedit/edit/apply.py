"""``orthoedit apply``: plan the edit, stream the shards, copy the small files, write the card."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ApplyConfig
from ..errors import BadInputError
from ..model.architectures import ArchitectureTable
from ..model.checkpoint import INDEX_NAME, OTHER_WEIGHT_PATTERNS, Checkpoint
from ..model.direction import DirectionSet, biproject, harmless_mean, load_directions
from ..model.quant import quant_format
from ..model.source import read_config, resolve_model
from ..output import check_target, inputs_of, staged_output
from .card import artifact_names, render_card, source_metadata
from .plan import Plan, build_plan
from .scope import load_scales
from .writer import OnBytes, stream_edit, total_bytes

#: Where the direction artifact goes in the output: a subfolder, so that no tool takes a
#: ``direction.safetensors`` at the top level for part of the weights.
ARTIFACT_DIR = "orthoedit"
#: Never copied from the source: weights of other formats, and the README the card replaces.
SKIP_FILES = (*OTHER_WEIGHT_PATTERNS, "*.safetensors", "consolidated.*", "README.md", INDEX_NAME)


@dataclass
class Prepared:
    plan: Plan
    folder: Path
    checkpoint: Checkpoint
    config: dict
    direction_paths: list[Path]
    reads: list[Path]  # every local input: no output may be, hold or lie inside one


def prepare(cfg: ApplyConfig, table: ArchitectureTable | None = None) -> Prepared:
    """Resolve the model, validate every input and build the plan; writes nothing. ``table``:
    the model's own (a shipped or derived one) unless given."""
    from ..model.derive import check_coverage, table_or_derived

    is_local = Path(cfg.model).expanduser().exists()
    if not cfg.dry_run:  # before any download: a bad --out must not cost a model fetch
        check_target(cfg.out, inputs_of(cfg), cfg.overwrite)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table or table_or_derived(config)
    checkpoint = Checkpoint.open(folder, quant_format(config))
    check_coverage(table, checkpoint.tensors)
    d_model, n_layers, _ = table.dims(config)
    direction = load_directions(
        cfg.direction, d_model, n_layers, cfg.direction_layer, cfg.per_layer
    )
    details: dict = {}
    if cfg.harmless_mean is not None and cfg.method != "biprojected":
        raise BadInputError("--harmless-mean is for --method biprojected.")
    if cfg.method == "biprojected":
        direction, details = _biprojected(direction, cfg, d_model, n_layers)
    plan = build_plan(
        table=table,
        checkpoint=checkpoint,
        config=config,
        direction=direction,
        source=str(folder) if is_local else cfg.model,
        revision=revision,
        base_model=cfg.base_model or (None if is_local else cfg.model),
        sites=cfg.sites,
        layers=cfg.layers,
        scales=load_scales(cfg.scales, n_layers),
        tied_policy=cfg.tied,
        method=cfg.method,
        method_details=details,
    )
    return Prepared(
        plan, folder, checkpoint, config, list(cfg.direction), [folder, *inputs_of(cfg)]
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


def copy_small_files(source: Path, out: Path, config: dict, untie: bool) -> None:
    """config, generation config, tokenizer, chat template... as-is; config edited on untie."""
    for path in sorted(source.iterdir()):
        if not path.is_file() or any(path.match(p) for p in SKIP_FILES):
            continue
        if path.name == "config.json" and untie:
            edited = json.loads(json.dumps(config))
            edited["tie_word_embeddings"] = False
            if isinstance(edited.get("text_config"), dict):
                edited["text_config"]["tie_word_embeddings"] = False
            (out / "config.json").write_text(json.dumps(edited, indent=2) + "\n")
            continue
        shutil.copyfile(path, out / path.name)


def execute(prepared: Prepared, out: Path, overwrite: bool, progress: OnBytes | None = None):
    """Write the edited checkpoint to ``out`` atomically. Returns the output folder."""
    target = check_target(out, prepared.reads, overwrite)
    plan = prepared.plan
    with staged_output(target) as tmp:
        stream_edit(plan, prepared.checkpoint, tmp, progress)
        copy_small_files(
            prepared.folder, tmp, prepared.config, untie=plan.tied and plan.tied_policy == "untie"
        )
        plan.save(tmp)
        meta = source_metadata(prepared.folder)
        render_card(plan, meta).save(tmp / "README.md")
        copy_directions(prepared.direction_paths, tmp / ARTIFACT_DIR)
    return target


def copy_directions(paths: list[Path], folder: Path) -> None:
    """Each direction file, and measure's ``direction.json`` record beside it when there is
    one, under the artifact folder."""
    folder.mkdir()
    for path, name in zip(paths, artifact_names(paths), strict=True):
        shutil.copyfile(path, folder / name)
        record = path.with_name("direction.json")  # written by measure beside the tensor
        if record.is_file():
            shutil.copyfile(record, folder / (name.rsplit(".", 1)[0] + ".json"))


def apply(
    cfg: ApplyConfig, progress: OnBytes | None = None, table: ArchitectureTable | None = None
) -> tuple[Plan, Path | None]:
    """Library entry point: the plan, and the output folder (None on a dry run)."""
    prepared = prepare(cfg, table)
    if cfg.dry_run:
        return prepared.plan, None
    return prepared.plan, execute(prepared, cfg.out, cfg.overwrite, progress)


def edit_size(prepared: Prepared) -> int:
    return total_bytes(prepared.plan, prepared.checkpoint)
