"""Baseline for ``bench_apply.py``: copy a folder's files through user space, in Python.

Every byte is read into a 64 MiB buffer and written out again, so the kernel cannot offload the
copy (``cp`` may use ``copy_file_range`` or reflinks and finish in a fraction of a second).
Usage: ``python benchmarks/byte_copy.py SRC DST``.
"""

from __future__ import annotations

import os
import sys

BLOCK = 64 * 1024 * 1024


def copy_folder(src: str, dst: str) -> int:
    """Copy the plain files of ``src`` into the new folder ``dst``; returns bytes copied."""
    os.makedirs(dst)
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            continue
        with (
            open(path, "rb", buffering=0) as fin,
            open(os.path.join(dst, name), "xb", buffering=0) as fout,
        ):
            while n := fin.readinto(buf):
                block = view[:n]
                while block:
                    block = block[fout.write(block) :]
                total += n
    return total


if __name__ == "__main__":
    copy_folder(sys.argv[1], sys.argv[2])
