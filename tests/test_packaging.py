"""The project's own packaging: a wheel builds without a warning and carries its data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_warnings_and_ships_its_data(tmp_path):
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*args, "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "warning" not in said.lower(), said
    (wheel,) = tmp_path.glob("orthoedit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "orthoedit/architectures/llama.yaml",
        "orthoedit/pools/harmful.jsonl",
        "orthoedit/organism/chat/config.json",
        "orthoedit/evals/data",
    ):
        assert any(n.startswith(needed) for n in names), needed


def test_editable_build_prints_no_setuptools_note(tmp_path):
    """``pip install -e .`` (what make does) goes through setuptools' editable build; a plain
    src layout makes it one .pth entry, with no warning and no note."""
    code = (
        "import sys; from setuptools import build_meta; "
        "print(build_meta.build_editable(sys.argv[1]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    for word in ("warning", "editable installation", "careful"):
        assert word not in said.lower(), said
    (wheel,) = tmp_path.glob("orthoedit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".pth") for n in names)
