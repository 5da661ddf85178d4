"""Evaluation reports: Markdown for people, a PNG to look at (JSON is written by the caller);
one module per stage."""

from __future__ import annotations

from .attribution import attribute_markdown, attribute_pngs
from .bench import bench_markdown, bench_png
from .safety import safety_markdown, safety_png
from .search import failure_text, search_markdown, search_png
from .sites import sites_markdown, sites_png

__all__ = [
    "attribute_markdown",
    "attribute_pngs",
    "bench_markdown",
    "bench_png",
    "failure_text",
    "safety_markdown",
    "safety_png",
    "search_markdown",
    "search_png",
    "sites_markdown",
    "sites_png",
]
