"""``orthoedit apply MODEL.gguf --out EDITED.gguf``: the edit of a GGUF, GGUF to GGUF.

The plan is built exactly as for safetensors (``GgufCheckpoint`` presents the tensors under
transformers names); ``gguf_write`` streams the output. The output carries provenance keys:
``orthoedit.version``, ``orthoedit.direction.sha256`` and ``orthoedit.plan`` (the plan JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import ApplyConfig
from ..errors import BadInputError, UnsupportedModelError
from ..model.architectures import ArchitectureTable
from ..model.gguf import (
    GgufCheckpoint,
    GgufLayout,
    gguf_table,
    layout_config,
    read_layout,
    resolve_gguf,
)
from ..output import check_file_target, inputs_of, staged_file
from .gguf_write import entries, write_gguf
from .plan import Plan
from .planning import plan_for
from .writer import OnBytes


@dataclass
class PreparedGguf:
    plan: Plan
    layout: GgufLayout
    checkpoint: GgufCheckpoint
    config: dict
    reads: list[Path]
    notes: list[str] = field(default_factory=list)  # tensors written in another type

    @property
    def size(self) -> int:
        """Bytes the edit writes (for progress bars)."""
        return sum(e.nbytes for e in entries(self.plan, self.checkpoint)[0])


def prepare_gguf(cfg: ApplyConfig, table: ArchitectureTable | None = None) -> PreparedGguf:
    """Resolve the GGUF, validate every input and build the plan; writes nothing."""
    is_local = Path(cfg.model).expanduser().exists()
    if not cfg.dry_run:
        _check_out(cfg)
    path = resolve_gguf(cfg.model, cfg.revision)
    if not cfg.dry_run:
        check_file_target(cfg.out, [path, *inputs_of(cfg)], cfg.overwrite, "--out")
    layout = read_layout(path)
    config = layout_config(layout)
    table = table or gguf_table(config, path)
    checkpoint = GgufCheckpoint.open(layout, table.dims(config)[1])
    plan = plan_for(cfg, table, checkpoint, config, str(path) if is_local else cfg.model,
                    None, base_model=cfg.base_model)  # fmt: skip
    _check_layout(plan, checkpoint)
    notes = entries(plan, checkpoint)[1]
    plan = plan.model_copy(update={"warnings": [*plan.warnings, *notes]})
    return PreparedGguf(plan, layout, checkpoint, config, [path, *inputs_of(cfg)], notes)


def _check_out(cfg: ApplyConfig) -> None:
    if cfg.out is None:
        raise BadInputError("--out is required (or pass --dry-run).")
    if Path(cfg.out).suffix.lower() != ".gguf":
        raise BadInputError(f"--out {cfg.out}: the edit of a GGUF is a GGUF; name it *.gguf.")


def _check_layout(plan: Plan, checkpoint: GgufCheckpoint) -> None:
    """ggml stores every matrix it multiplies as ``[out, in]`` and an embedding as rows: a
    writer the table edits along another axis was transposed by the converter, and is refused
    rather than edited along the wrong axis."""
    for op in plan.ops:
        tensor, expert = checkpoint.source[op.tensor]
        ndim = len(tensor.shape) - (expert is not None)
        rows = op.site == "embed" or "embed" in tensor.name or "token_embd" in tensor.name
        expected = 0 if ndim == 1 else (ndim - 1 if rows else ndim - 2)
        if op.axis != expected:
            raise UnsupportedModelError(
                f"{op.tensor} is stored as {tensor.name} with its residual axis moved by the "
                "GGUF converter; edit the safetensors checkpoint and export it as GGUF."
            )


def provenance(plan: Plan) -> dict[str, str]:
    """The metadata keys an edited GGUF gains."""
    return {
        "orthoedit.version": __version__,
        "orthoedit.direction.sha256": ",".join(f.sha256 for f in plan.direction_files),
        "orthoedit.plan": json.dumps(plan.model_dump(mode="json"), separators=(",", ":")),
    }


def execute_gguf(
    prepared: PreparedGguf, out: Path, overwrite: bool, progress: OnBytes | None = None
) -> Path:
    """Write the edited GGUF to ``out`` atomically. Returns its path."""
    target = check_file_target(out, prepared.reads, overwrite, "--out")
    keys = provenance(prepared.plan)
    with staged_file(target) as tmp:
        write_gguf(prepared.plan, prepared.checkpoint, keys, tmp, progress)
    return target
