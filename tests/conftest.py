"""Shared fixtures: tiny models of every family, built once per session, and helpers."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from orthoedit.model.direction import save_direction
from tiny import build_tiny_model

D_MODEL = 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(family, **build_kwargs) -> Path`` (cached; treat the folder as read-only)."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(family: str, **kwargs) -> Path:
        key = (family, *sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in cache:
            out = root / f"{family}-{len(cache)}"
            cache[key] = build_tiny_model(family, out, **kwargs)
        return cache[key]

    return get


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """``model_copy(family, **kwargs) -> Path``: a private, writable copy of a tiny model."""

    def get(family: str, **kwargs) -> Path:
        dst = tmp_path / f"src-{family}"
        shutil.copytree(tiny_model(family, **kwargs), dst)
        return dst

    return get


@pytest.fixture(scope="session")
def direction_file(tmp_path_factory) -> Path:
    """A float32 ``direction`` of size 32 (the tiny models' width), seeded."""
    gen = torch.Generator().manual_seed(1234)
    path = tmp_path_factory.mktemp("direction") / "direction.safetensors"
    return save_direction(path, torch.randn(D_MODEL, generator=gen), {"source": "test"})


@pytest.fixture(scope="session")
def organism_run(tmp_path_factory) -> Path:
    """recipes/organism.yaml run once, all six stages (about 25 s); read-only for tests, and
    reruns of it must leave every output as it was."""
    from orthoedit.pipeline.run import run

    out = tmp_path_factory.mktemp("organism-run") / "run"
    run(ROOT / "recipes" / "organism.yaml", out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def organism_measured(tmp_path_factory) -> Path:
    """measure on the organism as recipes/organism.yaml runs it, with its selection given
    (layer 2, position -1, what it selects) and no filter (the organism refuses every harmful
    and answers every harmless train prompt), so that it takes seconds; read-only for tests
    (``orthoedit search --candidates``)."""
    from orthoedit.config import MeasureConfig
    from orthoedit.measure.candidates import measure
    from orthoedit.organism import CHAT_MODEL

    prompts = CHAT_MODEL.parent / "prompts"
    cfg = MeasureConfig(
        model=str(CHAT_MODEL),
        out=tmp_path_factory.mktemp("measure") / "direction",
        harmful=str(prompts / "harmful-train.jsonl"),
        harmless=str(prompts / "harmless-train.jsonl"),
        filter=False,
        layer=2,
        position=-1,
    )
    return measure(cfg, log=lambda m: None).out


def folder_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and bytes (to prove a folder is untouched)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def leftovers(parent: Path) -> list[str]:
    """Temporary folders orthoedit might have left beside an output."""
    return sorted(
        p.name for p in Path(parent).iterdir() if ".orthoedit-" in p.name or ".old-" in p.name
    )


def sigint_as_on_a_terminal() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a shell starts background
    jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt; a terminal's
    Ctrl-C reaches a process whose SIGINT is the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
