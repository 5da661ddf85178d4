"""``orthoedit export gguf`` with llama.cpp's real converter, on the edited model organism (the
recipe's output): each GGUF, loaded back by transformers, computes what the safetensors
checkpoint computes, within a bound per type; llama.cpp itself runs the F32 file to the same
logits.

The converter is found as export finds it: ``$ORTHOEDIT_LLAMA_CPP`` (a llama.cpp checkout or an
unpacked llama-cpp-python 0.3.36 sdist), else the pinned sdist in orthoedit's cache (fetched by
a first ``orthoedit export gguf``). Without it, or without sentencepiece, these tests skip: the
default suite never downloads it. The organism's word-level tokenizer is one llama.cpp does not
know, so the folder gets a sentencepiece model trained here (the converter then writes that
vocabulary; the logits are compared on token ids).

Bounds, max |Δlogit| against the safetensors checkpoint in float32 (the organism's logits reach
about 15), measured at 0 (F32), 0.0077 (F16), 0.077 (BF16), 0.29 (Q8_0), 0.34 (Q6_K) and 1.2
(Q4_K_M) on the organism with a random direction; here about 3x that. llama.cpp's own run of
the F32 file differs by 0.0043 at most (its KV cache is F16); the bound is 0.02.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from orthoedit.config import ExportGgufConfig
from orthoedit.export import llama_cpp
from orthoedit.export.gguf import export_gguf

#: Type -> bound on max |Δlogit| (see the module's docstring).
BOUNDS = {"F32": 0.0, "F16": 0.03, "BF16": 0.3, "Q8_0": 1.0, "Q6_K": 1.0, "Q4_K_M": 3.0}


def _converter() -> Path | None:
    given = os.environ.get(llama_cpp.ENV)
    if given:
        return Path(given)
    cached = llama_cpp.cache_dir() / f"llama-cpp-python-{llama_cpp.LLAMA_CPP_PYTHON}"
    return cached if (cached / llama_cpp.SCRIPT).is_file() else None


pytestmark = [
    pytest.mark.skipif(
        _converter() is None,
        reason=f"llama.cpp's converter not found: set ${llama_cpp.ENV} to a llama.cpp checkout or "
        "an unpacked llama-cpp-python 0.3.36 sdist, or run orthoedit export gguf once",
    ),
    pytest.mark.skipif(
        not llama_cpp.installed("sentencepiece"), reason="needs sentencepiece (orthoedit[export])"
    ),
]


def _sentencepiece_model(texts: list[str]) -> bytes:
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=120,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(organism_run, tmp_path_factory):
    """The organism's edited checkpoint with a sentencepiece tokenizer, exported once."""
    model = tmp_path_factory.mktemp("export-real") / "model"
    shutil.copytree(organism_run / "model", model)
    words = (organism_run / "model" / "tokenizer.json").read_text().split('"')[1::2]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    (model / "tokenizer.model").write_bytes(_sentencepiece_model(texts))
    types = ["F32", "F16", "BF16", "Q8_0"]
    if llama_cpp.installed("llama_cpp"):
        types += ["Q6_K", "Q4_K_M"]
    cfg = ExportGgufConfig(model_dir=model, types=types, llama_cpp=_converter(), name="organism")
    return model, export_gguf(cfg, log=lambda m: None)


def _ids(model: Path) -> torch.Tensor:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    return torch.randint(4, vocab, (3, 24), generator=torch.Generator().manual_seed(0))


def _logits(folder: Path, ids: torch.Tensor, gguf_file: str | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(ids).logits


def test_every_type_loads_back_within_its_bound(exported):
    model, export = exported
    asked = ["F32", "F16", "BF16", "Q8_0"] + ["Q6_K", "Q4_K_M"] * llama_cpp.installed("llama_cpp")
    assert sorted(f.type for f in export.files) == sorted(asked)  # by their headers
    ids = _ids(model)
    reference = _logits(model, ids)
    for file in export.files:
        got = _logits(export.folder, ids, file.name)
        diff = (got - reference).abs().max().item()
        assert diff <= BOUNDS[file.type], f"{file.type}: max |Δlogit| {diff:.4g}"
        if file.type == "F32":
            assert torch.equal(got, reference)  # the converter changed no value


@pytest.mark.skipif(not llama_cpp.installed("llama_cpp"), reason="needs llama-cpp-python")
def test_llama_cpp_runs_the_f32_file_to_the_same_logits(exported):
    from llama_cpp import Llama

    model, export = exported
    ids = _ids(model)
    reference = _logits(model, ids)
    path = export.folder / "organism-F32.gguf"
    llm = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    for row, expected in zip(ids.tolist(), reference, strict=True):
        llm.reset()
        llm.eval(row)
        got = torch.tensor(llm.scores[: len(row)])
        assert (got - expected).abs().max().item() < 0.02  # measured 0.0043
