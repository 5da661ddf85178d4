"""Prompt sets from files: ``.jsonl``, ``.json``, ``.csv`` or ``.txt`` (one prompt a line).

Every loader returns ``[{"prompt": str, "category": str}, ...]`` and fails with one clear line
on a missing file, a missing column, non-UTF-8 bytes or an empty set.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import BadInputError

FORMATS = (".jsonl", ".json", ".csv", ".txt")


def _text(path: Path) -> str:
    if not path.is_file():
        raise BadInputError(f"prompt file {path} does not exist.")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"{path} is not UTF-8 (byte {err.start}); re-save it as UTF-8."
        ) from None


def _pick(row, column: str, path: Path, where: str) -> dict:
    if isinstance(row, str):
        return {"prompt": row, "category": ""}
    if not isinstance(row, dict):
        raise BadInputError(f"{path}{where}: expected an object or a string, got {row!r:.60}.")
    if column not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise BadInputError(
            f"{path}{where} has no column {column!r} (columns: {keys}); pass --column NAME."
        )
    return {"prompt": str(row[column]), "category": str(row.get("category") or "")}


def load_prompt_file(path: str | Path, column: str = "prompt") -> list[dict]:
    """Read one prompt set; ``column`` names the prompt field of jsonl/json/csv rows."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BadInputError(f"{path}: unknown prompt format; use one of {', '.join(FORMATS)}.")
    text = _text(path)
    if suffix == ".txt":
        items = [{"prompt": line.strip(), "category": ""} for line in text.splitlines()]
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        items = [_pick(row, column, path, f" row {i + 2}") for i, row in enumerate(rows)]
    elif suffix == ".jsonl":
        items = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BadInputError(f"{path} line {i + 1}: invalid JSON ({err.msg}).") from None
                items.append(_pick(row, column, path, f" line {i + 1}"))
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path}: invalid JSON ({err.msg}, line {err.lineno}).") from None
        if not isinstance(rows, list):
            raise BadInputError(f"{path}: expected a JSON list of prompts or objects.")
        items = [_pick(row, column, path, f" item {i}") for i, row in enumerate(rows)]
    items = [item for item in items if item["prompt"].strip()]
    if not items:
        raise BadInputError(f"{path} holds no prompts.")
    return items
