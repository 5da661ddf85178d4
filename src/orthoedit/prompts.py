"""Where every command gets its prompts (``load_prompts``): the bundled pools (``bundled``),
the organism's prompts (``organism``), files (``.jsonl``, ``.json``, ``.csv``, ``.txt`` with
one prompt a line) or datasets (a Hub dataset id, or a local dataset folder, read with
``datasets``), with the same options everywhere (``--column``, ``--split``).

Every loader returns ``[{"prompt": str, "category": str}, ...]`` and fails with one clear line
on a missing file or dataset, a missing column or split, non-UTF-8 bytes or an empty set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path

from .errors import BadInputError

FORMATS = (".jsonl", ".json", ".csv", ".txt")
#: Named prompt sets: the project's bundled pools and the model organism's prompts.
BUNDLED, ORGANISM = "bundled", "organism"
KINDS = ("harmful", "harmless")


def load_prompts(
    source: str | Path | None,
    kind: str | None = None,
    pool_split: str = "test",
    *,
    column: str = "prompt",
    split: str = "train",
) -> list[dict]:
    """The prompts of ``source`` as every command reads them.

    ``None`` or ``bundled``: the bundled pool of ``kind`` (harmful or harmless; both, in that
    order, when ``kind`` is None) at ``pool_split`` (train / val for choices, test for
    evaluation); ``organism``: the organism's prompts likewise; anything else a prompt file
    or a dataset, its prompts in ``column``, a dataset read at ``split``."""
    if source is None or str(source) in (BUNDLED, ORGANISM):
        if str(source) == ORGANISM:
            from .organism import load_prompts as load
        else:
            from .pools import load_pool as load
        kinds = KINDS if kind is None else (kind,)
        items = [item for k in kinds for item in load(k, pool_split)]
    else:
        items = load_prompt_source(source, column, split)
    return [{"prompt": i["prompt"], "category": i.get("category") or ""} for i in items]


def prompt_texts(*args, **kwargs) -> list[str]:
    """``load_prompts``, the prompt texts only."""
    return [item["prompt"] for item in load_prompts(*args, **kwargs)]


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


def load_prompt_dataset(name: str, split: str = "train", column: str = "prompt") -> list[dict]:
    """One split of a dataset: a Hub id (``owner/name``) or a local dataset folder."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    try:
        data = datasets.load_dataset(name, split=split)
    except ValueError as err:  # unknown split, among others
        raise BadInputError(f"dataset {name!r}: {_first_line(err)}") from None
    except Exception as err:  # not found, offline, gated
        raise BadInputError(
            f"cannot load dataset {name!r} (split {split!r}): {_first_line(err)}"
        ) from None
    if column not in data.column_names:
        raise BadInputError(
            f"dataset {name!r} (split {split!r}) has no column {column!r} (columns: "
            f"{', '.join(data.column_names)}); pass --column NAME."
        )
    categories = data["category"] if "category" in data.column_names else None
    items = [
        {"prompt": str(text), "category": str(categories[i] or "") if categories else ""}
        for i, text in enumerate(data[column])
        if text is not None and str(text).strip()
    ]
    if not items:
        raise BadInputError(f"dataset {name!r} (split {split!r}) holds no prompts.")
    return items


def load_prompt_source(
    source: str | Path, column: str = "prompt", split: str = "train"
) -> list[dict]:
    """A prompt file when ``source`` names one (by its suffix or because it is a file), else a
    dataset (Hub id or local dataset folder) read at ``split``."""
    if is_prompt_file(source):
        return load_prompt_file(source, column)
    return load_prompt_dataset(str(source), split, column)


def is_prompt_file(source: str | Path) -> bool:
    """A prompt file, by its suffix or because it is a file; anything else names a dataset."""
    path = Path(source)
    return path.suffix.lower() in FORMATS or path.is_file()


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def prompt_digest(prompts: list[str]) -> str:
    """sha256 of a prompt list, one per line in order (as ``direction.json`` records them)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def load_set(source: str | None, kind: str, cfg) -> list[dict]:
    """Held-out prompt items for one kind: the bundled test split, the organism's
    (``organism``), or a file / dataset; ``cfg.n`` draws that many with ``cfg.seed`` (any
    config with ``column``, ``split``, ``n`` and ``seed``)."""
    items = load_prompts(source, kind, "test", column=cfg.column, split=cfg.split)
    if cfg.n is not None and cfg.n < len(items):
        items = random.Random(cfg.seed).sample(items, cfg.n)
    return items


def load_sets(cfg) -> dict[str, list[str]]:
    """Harmful and harmless prompt texts from ``cfg.harmful``/``cfg.harmless`` as ``load_set``
    draws them."""
    sets = {kind: load_set(getattr(cfg, kind), kind, cfg) for kind in ("harmful", "harmless")}
    return {kind: [item["prompt"] for item in items] for kind, items in sets.items()}
