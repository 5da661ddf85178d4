"""``orthoedit export gguf``: an edited checkpoint as GGUF files, written by llama.cpp's converter
and quantizer (``llama_cpp``), in a folder that push uploads (docs/design.md, "GGUF export").

The folder (``MODEL_DIR/gguf`` unless ``--out``) holds ``NAME-TYPE.gguf`` for each type and
``export.json``, the record of what wrote each file from what. It is written through a staging
folder, so it appears whole or not at all, and every file's header is checked to be of the
type asked for. ``read_export`` is the one reader of such a folder (push, the card).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..config import ExportGgufConfig
from ..errors import BadInputError, CheckFailedError
from ..model.checkpoint import Checkpoint
from ..output import check_target, inputs_of, staged_output
from .llama_cpp import (
    CONVERTED,
    LOSSLESS,
    QUANTIZED,
    Converter,
    convert,
    find_converter,
    missing_tools,
    quantize,
)

if TYPE_CHECKING:
    from ..progress import Progress

#: The export's folder inside the checkpoint folder (its default place), and its record.
FOLDER = "gguf"
RECORD = "export.json"
SUFFIX = ".gguf"


@dataclass(frozen=True)
class GgufFile:
    """One exported file: its name, its type as its header says, its size."""

    name: str
    type: str
    size: int


@dataclass
class GgufExport:
    """A folder of GGUF files, as ``read_export`` reads it."""

    folder: Path
    files: list[GgufFile]
    record: dict = field(default_factory=dict)  # export.json, when there is one


@dataclass
class Job:
    model_dir: Path
    target: Path
    types: list[str]
    name: str
    float_type: str  # the checkpoint's own float type, which the quantizer starts from
    converter: Converter


def prepare(cfg: ExportGgufConfig, log: Callable[[str], None] = print) -> Job:
    """Check every input and find the tools (fetching the pinned converter on first use);
    writes nothing else."""
    folder = Path(cfg.model_dir).expanduser().resolve()
    if not folder.is_dir():
        raise BadInputError(f"{cfg.model_dir} is not a folder.")
    if not (folder / "config.json").is_file():
        raise BadInputError(
            f"{folder} has no config.json: export converts a checkpoint written by orthoedit apply."
        )
    checkpoint = Checkpoint.open(folder)
    default = folder / FOLDER
    target = Path(cfg.out).expanduser().resolve() if cfg.out is not None else default
    # the default folder lies inside the checkpoint: the converter reads only the checkpoint's
    # own files, and push takes it from there
    reads = [p for p in inputs_of(cfg) if not (target == default and p == folder)]
    target = check_target(target, reads, cfg.overwrite)
    problem = missing_tools(cfg.types)
    if problem:
        raise BadInputError(problem)
    converter = find_converter(cfg.llama_cpp, log)
    name = cfg.name or default_name(folder)
    return Job(folder, target, list(cfg.types), name, float_type(checkpoint), converter)


def default_name(folder: Path) -> str:
    """The source model's name with ``-orthoedit`` (from plan.json), else the folder's name."""
    from ..edit.plan import PLAN_NAME, Plan

    if (folder / PLAN_NAME).is_file():
        return f"{Path(Plan.load(folder).source).name}-orthoedit"
    return folder.name


def float_type(checkpoint: Checkpoint) -> str:
    """The GGUF type that holds the checkpoint's matrices exactly (BF16 for a quantized one:
    the converter dequantizes FP8 to it)."""
    sizes: dict[str, int] = {}
    for info in checkpoint.tensors.values():
        if len(info.shape) >= 2:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    dominant = max(sizes, key=sizes.get) if sizes else "BF16"
    return LOSSLESS.get(dominant, "BF16")


def export_gguf(
    cfg: ExportGgufConfig,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> GgufExport:
    """Write the GGUF files of ``cfg.types`` and their record; returns the folder as read back."""
    job = prepare(cfg, log)
    logs = Path(tempfile.mkdtemp(prefix="orthoedit-gguf-logs-"))
    try:
        with staged_output(job.target) as tmp:
            record = _write(job, tmp, logs, log, progress)
            (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
            for file in read_export(tmp).files:
                wanted = record["files"][file.name]["type"]
                if file.type != wanted:
                    raise CheckFailedError(
                        f"{file.name} is {file.type} by its header, not {wanted}."
                    )
    except BadInputError:
        raise  # a tool failed: its log is kept, and named
    except BaseException:
        shutil.rmtree(logs, ignore_errors=True)
        raise
    shutil.rmtree(logs, ignore_errors=True)
    return read_export(job.target)


def _write(job: Job, tmp: Path, logs: Path, log, progress) -> dict:
    """Every file into ``tmp``: the converter's types, then the quantizer's from the
    checkpoint's own float type (converted for them alone when not asked for)."""
    quantized = [t for t in job.types if t in QUANTIZED]
    converted = [t for t in job.types if t in CONVERTED]
    if quantized and job.float_type not in converted:
        converted.insert(0, job.float_type)
    files: dict[str, dict] = {}

    def path(kind: str) -> Path:
        if kind in job.types:
            return tmp / f"{job.name}-{kind}{SUFFIX}"
        return tmp / f".{job.name}-{kind}.input{SUFFIX}"  # removed before the rename

    def step(kind: str, by: str, source: str, run: Callable[[str], None]) -> None:
        if progress is not None:
            progress.start(f"{by}: {kind}", None)
        began = time.perf_counter()
        run(kind)
        seconds, size = time.perf_counter() - began, path(kind).stat().st_size
        log(f"{path(kind).name}: {by}, {size / 1e6:,.1f} MB in {seconds:.1f} s")
        if kind in job.types:
            files[path(kind).name] = {"type": kind, "by": by, "from": source, "bytes": size}

    model, source = job.model_dir, path(job.float_type)
    for kind in converted:
        step(kind, "llama.cpp's converter", "safetensors", lambda k: convert(
            job.converter, model, k, path(k), job.name, logs / f"convert-{k}.log"
        ))  # fmt: skip
    for kind in quantized:
        step(kind, "llama.cpp's quantizer", job.float_type, lambda k: quantize(
            source, path(k), k, logs / f"quantize-{k}.log"
        ))  # fmt: skip
    if job.float_type not in job.types:
        path(job.float_type).unlink(missing_ok=True)
    return {
        "written_by": f"orthoedit {__version__}",
        "checkpoint": job.model_dir.name,
        "converter": job.converter.origin,
        "quantizer": _quantizer() if quantized else None,
        "files": files,
    }


def _quantizer() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("llama-cpp-python")
    except PackageNotFoundError:  # a llama_cpp module without its distribution's metadata
        found = "(version unknown)"
    return f"llama.cpp's quantizer from llama-cpp-python {found}"


def read_export(folder: Path) -> GgufExport:
    """The GGUF files of an export folder (types from their headers) and its record."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"{folder} is not a folder.")
    files = [
        GgufFile(p.name, header_type(p), p.stat().st_size)
        for p in sorted(folder.glob(f"*{SUFFIX}"))
        if not p.name.startswith(".")
    ]
    record = {}
    if (folder / RECORD).is_file():
        try:
            record = json.loads((folder / RECORD).read_text())
        except ValueError as err:
            raise BadInputError(f"{folder / RECORD}: not valid JSON ({err}).") from None
    return GgufExport(folder, files, record)


def header_type(path: Path) -> str:
    """A GGUF file's type, as its header names it (``general.file_type``: Q4_K_M, F16, ...);
    without that key, the type of most of its tensor bytes."""
    from gguf import GGMLQuantizationType, LlamaFileType

    from ..model.gguf import read_layout

    layout = read_layout(path)
    kind = layout.get("general.file_type")
    if kind is not None:
        try:
            return LlamaFileType(int(kind)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    sizes: dict[int, int] = {}
    for tensor in layout.tensors:
        sizes[tensor.type] = sizes.get(tensor.type, 0) + tensor.nbytes
    return GGMLQuantizationType(max(sizes, key=sizes.get)).name
