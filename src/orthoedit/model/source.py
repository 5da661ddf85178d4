"""Resolve MODEL to a local path and read its config and weights: a checkpoint folder (local or
a Hub id), or a GGUF file (local, or ``OWNER/REPO/FILE.gguf`` on the Hub; ``model/gguf.py``).
Every stage goes through here, so a GGUF is accepted, or refused, by each in the same words."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import BadInputError
from .checkpoint import Checkpoint
from .gguf import GgufCheckpoint, gguf_config, is_gguf, open_gguf, read_layout, resolve_gguf
from .hub import from_hub
from .quant import quant_format

_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
#: Files never needed from the Hub: other weight formats and original (non-HF) checkpoints.
HUB_IGNORE = [
    "*.bin",
    "*.pt",
    "*.pth",
    "*.gguf",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.tflite",
    "*.ot",
    "consolidated.*",
    "original/*",
    "onnx/*",
    "openvino/*",
    "coreml/*",
]


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Return (local folder, or GGUF file; resolved commit or None for a local path)."""
    if is_gguf(model):
        return _gguf(model, revision)
    path = _local(model, revision)
    if path is not None:
        return path, None
    from huggingface_hub import snapshot_download

    folder = Path(
        from_hub(model, revision, snapshot_download, ignore_patterns=HUB_IGNORE, what="download")
    )
    return folder, folder.name  # snapshot folders are named after the commit


def resolve_config(model: str, revision: str | None = None) -> Path:
    """A folder holding MODEL's config.json: a local folder, or the Hub snapshot folder with
    config.json alone fetched (no weights). A GGUF is its own config: its file (from the
    Hub: downloaded whole)."""
    if is_gguf(model):
        return _gguf(model, revision)[0]
    path = _local(model, revision)
    if path is not None:
        return path
    from huggingface_hub import hf_hub_download

    return Path(
        from_hub(model, revision, hf_hub_download, "config.json", what="reading config.json")
    ).parent


def _gguf(model: str, revision: str | None) -> tuple[Path, str | None]:
    """A GGUF's local path, and the commit it was downloaded at (None for a local file)."""
    local = Path(model).expanduser().exists()
    path = resolve_gguf(model, revision)
    if local:
        return path, None
    # hf_hub_download gives snapshots/COMMIT/FILENAME, and FILENAME may have folders
    return path, path.parents[len(model.split("/")) - 3].name


def _local(model: str, revision: str | None) -> Path | None:
    """MODEL's folder when it is a local path; None for a Hub id; bad input otherwise."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInputError(f"{model} is a file; MODEL must be a checkpoint folder or Hub id.")
        if revision is not None:
            raise BadInputError("--revision applies to Hub ids, not to local folders.")
        return path.resolve()
    if not _REPO_ID.match(model) or model.startswith((".", "/")):
        raise BadInputError(f"{model}: no such folder, and not a Hub model id.")
    return None


def read_config(folder: Path) -> dict:
    """config.json, refusing quantized checkpoints orthoedit cannot keep quantized up front;
    for a GGUF, its config from the metadata (``model.gguf.gguf_config``: a whole file, of an
    architecture with a shipped table)."""
    if is_gguf(folder):
        return gguf_config(folder)
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(
            f"{folder} has no config.json; is it a Hugging Face checkpoint?"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise BadInputError(f"{path}: cannot read ({err}).") from err
    quant_format(config, folder)  # refuses every quantization but FP8 blocks and MXFP4
    return config


def open_checkpoint(path: Path, quant=None) -> Checkpoint | GgufCheckpoint:
    """MODEL's weights as plans and hooks read them: the safetensors ``Checkpoint`` of a folder
    (``quant``: its quantized format), or the ``GgufCheckpoint`` of a GGUF file."""
    if is_gguf(path):
        return open_gguf(path)
    return Checkpoint.open(path, quant)


def config_digest(path: Path) -> str:
    """sha256 of what configures MODEL: config.json, or a GGUF's metadata bytes (its config,
    tokenizer and chat template)."""
    import hashlib

    if is_gguf(path):
        return hashlib.sha256(read_layout(path).kv_bytes).hexdigest()
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()


def pretrained(path: Path) -> tuple[Path, dict]:
    """``from_pretrained``'s folder and options for MODEL's local path: a GGUF is loaded from
    its folder with ``gguf_file`` (transformers dequantizes it; tokenizer and chat template are
    the file's), once ``read_layout`` has found it whole: transformers' own reader is slow to
    fail on a bad file, and fails with a traceback."""
    path = Path(path)
    if is_gguf(path):
        read_layout(path)
        return path.parent, {"gguf_file": path.name}
    return path, {}
