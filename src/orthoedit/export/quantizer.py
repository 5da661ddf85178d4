"""llama.cpp's quantizer on one file, in a process of its own (llama.cpp logs to its process's
standard error and aborts it on some errors):

    python -m orthoedit.export.quantizer SOURCE.gguf DEST.gguf Q4_K_M

``llama_model_quantize`` with llama.cpp's defaults (as ``llama-quantize SOURCE DEST Q4_K_M``:
its per-tensor mix for the type, output and embedding tensors by its own rules, all threads).
"""

from __future__ import annotations

import ctypes
import sys


def main(argv: list[str] | None = None) -> int:
    source, dest, kind = argv if argv is not None else sys.argv[1:]
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = 0  # llama.cpp's default: every hardware thread
    failed = llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params))
    if failed:
        print(
            f"error: llama_model_quantize failed to write {kind} (code {failed})", file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
