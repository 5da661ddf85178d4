"""llama.cpp as a reader of GGUF files (llama-cpp-python, the ``llama`` extra): logits of
token ids, for verify's check of a GGUF in a real consumer, and greedy answers for ``eval
safety`` and ``compare`` (``--backend llama.cpp``)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MISSING = "llama-cpp-python is not installed (pip install 'orthoedit[llama]')"
#: Tokens of context a llama.cpp session holds (prompt + answer).
CONTEXT = 4096


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


@dataclass
class LlamaCppSession:
    """A GGUF served by llama.cpp in this process (``--backend llama.cpp``): it answers what
    ``runtime.session.Session`` answers (``tok``, ``system``, ``stop``, ``vocab_size``,
    ``complete``, ``surprisal``, ``close``), on the token rows orthoedit renders with the
    file's tokenizer and chat template; greedy, one prompt at a time."""

    path: Path
    tok: object
    system: str | None
    stop: set[int]
    vocab_size: int
    llm: object = field(repr=False, default=None)

    @classmethod
    def open(cls, path: Path, cfg, tok=None) -> LlamaCppSession:
        from llama_cpp import Llama

        from .session import load_tokenizer

        tok = tok or load_tokenizer(path, getattr(cfg, "template", None))
        llm = Llama(
            model_path=str(path),
            n_ctx=CONTEXT,
            n_batch=512,
            n_threads=os.cpu_count() or 1,
            verbose=False,
        )
        stop = {i for i in (tok.eos_token_id, llm.token_eos()) if i is not None and i >= 0}
        return cls(path, tok, getattr(cfg, "system", None), stop, llm.n_vocab(), llm)

    def complete(self, rows: list[list[int]], new_tokens: int, progress=None) -> list[list[int]]:
        """Greedy completions of token rows, at most ``new_tokens`` each (the stop token kept,
        as the other engines keep it; the answers are cut by the same code)."""
        made = []
        for row in rows:
            answer: list[int] = []
            for token in self.llm.generate(list(row), top_k=1, top_p=1.0, min_p=0.0, temp=0.0):
                answer.append(int(token))
                if token in self.stop or len(answer) >= new_tokens:
                    break
            made.append(answer)
            if progress:
                progress(1)
        return made

    def surprisal(self, rows: list[list[int]], completions: list[list[int]]) -> list[float]:
        """Mean nats per token of each completion after its row; empty completions give 0."""
        out = []
        for row, done in zip(rows, completions, strict=True):
            if not done:
                out.append(0.0)
                continue
            self.llm.reset()
            self.llm.eval(list(row))
            nats = 0.0
            for token in done:
                logits = self._last_logits()
                top = logits.max()
                nats += float(top + np.log(np.exp(logits - top).sum()) - logits[token])
                self.llm.eval([int(token)])
            out.append(nats / len(done))
        return out

    def _last_logits(self) -> np.ndarray:
        """The logits after the last token evaluated (the session keeps no others)."""
        import llama_cpp

        found = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(found, shape=(self.vocab_size,)).astype(np.float64)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
