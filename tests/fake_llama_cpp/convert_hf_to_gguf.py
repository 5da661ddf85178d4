"""A stand-in for llama.cpp's convert_hf_to_gguf.py, for the tests of ``orthoedit export
gguf`` that do not need the real converter (tests/test_export.py): the same arguments, a GGUF
written by ``tests/gguf_tiny.py``. ``$FAKE_CONVERTER``: ``fail`` exits 1 with a traceback, as
the real one does for a tokenizer it does not know; ``mislabel`` records another file type."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf

from gguf_tiny import write_tiny_gguf

TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--outtype", choices=sorted(TYPES), required=True)
    parser.add_argument("--outfile", type=Path, required=True)
    parser.add_argument("--model-name")
    args = parser.parse_args()
    print("INFO:hf-to-gguf:Loading model:", args.model.name, file=sys.stderr)
    if os.environ.get("FAKE_CONVERTER") == "fail":
        print("Traceback (most recent call last):", file=sys.stderr)
        print('  File "conversion/base.py", line 1953, in get_vocab_base_pre', file=sys.stderr)
        print(
            "NotImplementedError: BPE pre-tokenizer was not recognized - update "
            "get_vocab_base_pre()",
            file=sys.stderr,
        )
        return 1
    kind = "f16" if os.environ.get("FAKE_CONVERTER") == "mislabel" else args.outtype
    write_tiny_gguf(args.model, args.outfile, TYPES[args.outtype], FILE_TYPES[kind])
    assert gguf.GGUFReader(args.outfile).tensors
    return 0


if __name__ == "__main__":
    sys.exit(main())
