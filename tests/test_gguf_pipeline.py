"""A GGUF model through every stage that runs one (issue 36, point 2): transformers loads it
dequantized, with the tokenizer and chat template of the file, and each stage gives what it
gives on the safetensors checkpoint the GGUF was written from; bad GGUFs are one line, exit 2,
nothing written, the source untouched.

The GGUFs are F32 (``tests/gguf_tiny.py``), so the two models are the same function and the
comparisons are exact up to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from gguf_tiny import write_tiny_gguf
from orthoedit.model.source import open_checkpoint, read_config, resolve_model
from orthoedit.runtime.session import load_model, load_tokenizer
from test_cli import cli

FAMILY = "qwen2"
#: measure on few prompts, selecting among the candidates by the plan's hooks (a random model
#: refuses nothing: no filter, a refusal token given, any KL): seconds on a CPU.
MEASURE = ["--no-filter", "--n-train", "8", "--n-val", "4", "--refusal-tokens", "<|end|>"]
MEASURE += ["--max-kl", "100"]


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(the tiny checkpoint folder, an F32 GGUF of it in a folder of its own)."""
    folder = tiny_model(FAMILY)
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return folder, write_tiny_gguf(folder, out)


@pytest.fixture(scope="module")
def measured(pair, tmp_path_factory) -> dict[str, Path]:
    """measure on each of the pair, with the same options."""
    root = tmp_path_factory.mktemp("measured")
    outs = {}
    for name, model in zip(("folder", "gguf"), pair, strict=True):
        outs[name] = root / name
        result = cli("measure", model, "--out", outs[name], *MEASURE)
        assert result.exit_code == 0, result.output
    return outs


def test_the_loader_reads_a_gguf_as_its_checkpoint(pair):
    """One loader: a GGUF resolves to its file, its config chooses the same table, its
    tokenizer (and chat template) is the file's, its weights load dequantized and give the
    checkpoint's logits."""
    import torch

    folder, gguf = pair
    path, revision = resolve_model(str(gguf))
    assert (path, revision) == (gguf.resolve(), None)
    config = read_config(path)
    assert config["model_type"] == FAMILY
    for key in ("hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        assert config[key] == read_config(folder)[key], key
    tok, tok_folder = load_tokenizer(path), load_tokenizer(folder)
    assert tok.chat_template == tok_folder.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False)
    assert tok(text)["input_ids"] == tok_folder(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        a, b = load_model(path).forward(ids).logits, load_model(folder).forward(ids).logits
    assert torch.equal(a, b)
    checkpoint = open_checkpoint(path)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert np.array_equal(checkpoint.read(name), open_checkpoint(folder).read(name))


def test_measure_on_a_gguf_is_measure_on_its_checkpoint(measured):
    """The means, every candidate, every score (the plan's hooks, planned on the GGUF's
    tensors) and the direction chosen are those of the safetensors checkpoint."""
    for name in ("candidates.safetensors", "direction.safetensors"):
        a, b = (load_file(measured[k] / name) for k in ("folder", "gguf"))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    records = [json.loads((measured[k] / "direction.json").read_text()) for k in measured]
    assert records[1]["model"].endswith(".gguf") and records[1]["revision"] is None
    assert records[0]["selection"] == "lowest bypass after filters"
    for key in ("layer", "position", "norm", "post_instruction_tokens", "prompt_hashes"):
        assert records[0][key] == records[1][key], key
    scores = [json.loads((measured[k] / "scores.json").read_text()) for k in measured]
    assert sum(s["kept"] for s in scores[0]["scores"]) >= 2  # a choice was made
    for a, b in zip(scores[0]["scores"], scores[1]["scores"], strict=True):
        assert (a["layer"], a["position"], a["kept"], a["why"]) == (
            b["layer"], b["position"], b["kept"], b["why"]
        )  # fmt: skip
        for key in ("bypass", "induce", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6, nan_ok=True), key
