"""Resolve MODEL (a local folder or a Hub id) to a local folder and read its config."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import BadInputError
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
    """Return (local folder, resolved commit or None for a local folder)."""
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
    config.json alone fetched (no weights)."""
    path = _local(model, revision)
    if path is not None:
        return path
    from huggingface_hub import hf_hub_download

    return Path(
        from_hub(model, revision, hf_hub_download, "config.json", what="reading config.json")
    ).parent


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


def from_hub(
    repo_id: str, revision: str | None, fetch, *args, what: str, missing: str = "", **kwargs
) -> str:
    """``fetch(repo_id, *args, revision=...)`` with the Hub's failures as one-line errors
    (``missing``: the message for a file the repository does not have)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return fetch(repo_id, *args, revision=revision, **kwargs)
    except GatedRepoError as err:
        raise BadInputError(f"{repo_id} is gated: accept its terms on the Hub and log in.") from err
    except RepositoryNotFoundError as err:
        raise BadInputError(f"{repo_id}: no such model on the Hub (or no access).") from err
    except RevisionNotFoundError as err:
        raise BadInputError(f"{repo_id}: revision {revision!r} not found.") from err
    except LocalEntryNotFoundError as err:
        raise BadInputError(
            f"{repo_id}: not in the local cache and the Hub cannot be reached; pass a local folder."
        ) from err
    except EntryNotFoundError as err:  # after its subclass LocalEntryNotFoundError
        raise BadInputError(
            missing or f"{repo_id} has no config.json; is it a transformers model?"
        ) from err
    except HfHubHTTPError as err:
        raise BadInputError(f"{repo_id}: {what} failed ({err}).") from err


def read_config(folder: Path) -> dict:
    """config.json, refusing quantized checkpoints orthoedit cannot keep quantized up front."""
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
