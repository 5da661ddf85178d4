"""llama.cpp as a reader of GGUF files (llama-cpp-python, the ``llama`` extra): logits of
token ids, for verify's check of a GGUF in a real consumer."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def logits(path: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per prompt (token ids ``[1, n]``), llama.cpp's logits ``[n, vocab]`` in float64."""
    from llama_cpp import Llama

    n_ctx = max(int(ids.shape[-1]) for ids in inputs) + 8
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=os.cpu_count() or 1,
        verbose=False,
    )
    try:
        out = []
        for ids in inputs:
            llm.reset()
            tokens = [int(t) for t in ids[0]]
            llm.eval(tokens)
            scores = np.array(llm.scores[: len(tokens)], dtype=np.float64)
            out.append(torch.from_numpy(scores))
        return out
    finally:
        llm.close()
