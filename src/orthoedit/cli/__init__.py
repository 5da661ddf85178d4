"""The ``orthoedit`` command line: each command parses its options into the stage's config,
calls one library function and prints (docs/design.md, "The pipeline").

``app`` is the Typer application and ``entry`` the executable; the commands are registered by
importing their modules: ``pipeline`` (measure, search, apply, verify), ``evaluate`` (eval
bench, eval safety, eval kl, compare), ``runs`` (run, demo, push), ``export`` (export gguf)
and ``research`` (study sites, attribute).
"""

from __future__ import annotations

from . import evaluate, export, pipeline, research, runs
from .app import app, entry
from .ui import console, option_error

__all__ = [
    "app",
    "console",
    "entry",
    "evaluate",
    "export",
    "option_error",
    "pipeline",
    "research",
    "runs",
]
