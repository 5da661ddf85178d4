"""The documentation: the command reference's generated part is what the app makes now (run
``make docs`` after changing a command or a config field), every relative link in README.md
and docs/ leads to a file, and the README stays short."""

from __future__ import annotations

import os
import re
from pathlib import Path

from orthoedit.docs import MARKER, commands, page_name, stale_pages, write_pages

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def test_every_command_has_a_fresh_reference_page():
    stale = stale_pages(REFERENCE)
    assert not stale, f"stale or missing: {', '.join(stale)}; run `make docs` to rewrite them"


def test_a_stale_page_is_found_and_its_prose_kept(tmp_path):
    write_pages(tmp_path)
    path = next(iter(commands()))
    page = tmp_path / page_name(path)
    prose = "# orthoedit x\n\nWritten by hand.\n\n"
    below = page.read_text().split(MARKER, 1)[1]
    page.write_text(prose + MARKER + below.replace("| `", "| `--gone` | | | |\n| `", 1))
    assert stale_pages(tmp_path) == [str(page)]
    assert write_pages(tmp_path) == [page]
    assert stale_pages(tmp_path) == []
    assert page.read_text().startswith(prose + MARKER)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def broken_links(files: list[Path]) -> list[str]:
    """Relative links (outside code blocks) whose file does not exist; anchors not checked."""
    found = []
    for path in files:
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            where = (path.parent / target.split("#", 1)[0]).resolve()
            if not where.exists():
                found.append(f"{os.path.relpath(path, ROOT)}: {target}")
    return found


def test_every_relative_link_resolves():
    assert broken_links(markdown_files()) == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("[ok](a.md#top) [web](https://x.org) [gone](b/c.md)\n")
    (tmp_path / "code.md").write_text("```\n[not a link](nowhere.md)\n```\n")
    found = broken_links([tmp_path / "a.md", tmp_path / "code.md"])
    assert len(found) == 1 and found[0].endswith("b/c.md")


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
