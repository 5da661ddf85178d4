"""Exports: export gguf."""

from __future__ import annotations

from ..config import ExportGgufConfig
from . import tables, ui
from .app import export_app
from .options import Cli, command


@command(
    export_app,
    "gguf",
    ExportGgufConfig,
    arguments=("model_dir",),
    cli={"types": Cli(type=list[str], flag="--type", metavar="TYPE")},
)
def gguf(cfg: ExportGgufConfig) -> None:
    """Convert an edited checkpoint into GGUF files with llama.cpp's own tools.

    llama.cpp's converter and quantizer (pinned: llama-cpp-python 0.3.36's) write one file
    per --type, into MODEL_DIR/gguf
    (or --out), where push uploads them beside the safetensors and lists them in the card.
    Exit 2 for bad input, or a checkpoint llama.cpp cannot convert (its log is kept)."""
    from ..export.gguf import FOLDER, export_gguf

    target = cfg.out if cfg.out is not None else cfg.model_dir / FOLDER
    with ui.progress() as progress:
        result = ui.guarded(lambda: export_gguf(cfg, log=ui.log, progress=progress), target)
    ui.out.print(tables.gguf_files(result))
    ui.wrote(f"{result.folder} ({len(result.files)} GGUF files)")
