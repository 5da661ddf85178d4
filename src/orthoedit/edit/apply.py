"""``orthoedit apply``: plan the edit, stream the shards, copy the small files, write the card."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import ApplyConfig
from ..folders import MeasureFolder
from ..model.architectures import ArchitectureTable
from ..model.checkpoint import INDEX_NAME, OTHER_WEIGHT_PATTERNS, Checkpoint
from ..model.gguf import is_gguf
from ..model.quant import quant_format
from ..model.source import read_config, resolve_model
from ..output import check_target, inputs_of, staged_output
from .card import artifact_names, render_card, source_metadata
from .plan import Plan
from .planning import plan_for
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
    the model's own (a shipped or derived one) unless given. A ``.gguf`` MODEL is prepared by
    ``gguf_apply``."""
    from ..model.derive import check_coverage, table_or_derived

    if is_gguf(cfg.model):
        from .gguf_apply import prepare_gguf

        return prepare_gguf(cfg, table)
    is_local = Path(cfg.model).expanduser().exists()
    if not cfg.dry_run:  # before any download: a bad --out must not cost a model fetch
        check_target(cfg.out, inputs_of(cfg), cfg.overwrite)
    folder, revision = resolve_model(cfg.model, cfg.revision)
    config = read_config(folder)
    table = table or table_or_derived(config)
    checkpoint = Checkpoint.open(folder, quant_format(config))
    check_coverage(table, checkpoint.tensors)
    source = str(folder) if is_local else cfg.model
    base_model = cfg.base_model or (None if is_local else cfg.model)
    plan = plan_for(cfg, table, checkpoint, config, source, revision, base_model)
    return Prepared(
        plan, folder, checkpoint, config, list(cfg.direction), [folder, *inputs_of(cfg)]
    )


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
    """Write the edited checkpoint to ``out`` atomically. Returns the output folder (the
    output file of a GGUF edit)."""
    if not isinstance(prepared, Prepared):
        from .gguf_apply import execute_gguf

        return execute_gguf(prepared, out, overwrite, progress)
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
        record = MeasureFolder.of(path).record  # written by measure beside the tensor
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
    if not isinstance(prepared, Prepared):
        return prepared.size
    return total_bytes(prepared.plan, prepared.checkpoint)
