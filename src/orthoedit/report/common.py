"""Number formats every report shares."""

from __future__ import annotations


def num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def signed(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"
