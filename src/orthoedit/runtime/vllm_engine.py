"""Greedy answers with vLLM (``--backend vllm``), for ``eval safety`` and ``compare`` (and
``eval bench``, through lm-eval's own vLLM backend).

``VllmSession`` answers what ``runtime.session.Session`` answers (``tok``, ``system``,
``stop``, ``vocab_size``, ``complete``, ``surprisal``, ``close``), so a stage does not know
which engine runs. orthoedit renders and tokenizes the prompts as it does for transformers
(the same token rows), vLLM takes token ids and gives token ids back, and the answers are cut
at the stop tokens and decoded as with transformers. Greedy decoding carries the model's
``repetition_penalty`` (transformers applies it to greedy answers too). The word-salad score
of ``eval safety --base`` reads the answers' log-probabilities as prompt log-probabilities
(one pass over prompt + answer, no generation).

``--tensor-parallel-size`` is vLLM's own; ``--data-parallel-size N`` runs N replicas as Ray
actors (each on ``--tensor-parallel-size`` GPUs) and deals the prompts to them in turn.
Where vLLM is not installed, ``resolved`` says so in one line and the command runs with
transformers. GGUF models run with transformers only (``resolved`` refuses them here: vLLM's
GGUF loading is not one orthoedit has checked against its own)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from ..errors import BadInputError
from ..model.gguf import is_gguf
from .session import Session, load_tokenizer, stop_ids

MISSING = "vLLM is not installed (pip install vllm, on a machine with NVIDIA GPUs)"


def available() -> bool:
    return find_spec("vllm") is not None


def resolved(cfg, log):
    """``cfg``; or, where it asks for vLLM and vLLM is not installed, a copy that runs with
    transformers (said in one line). Data parallel without Ray, and a GGUF model, are bad
    input. ``--backend llama.cpp`` without llama-cpp-python runs with transformers too."""
    if cfg.backend == "llama.cpp":
        from . import llama_cpp

        if llama_cpp.available():
            return cfg
        log(f"--backend llama.cpp: {llama_cpp.MISSING}; generating with transformers instead")
        return cfg.model_copy(update={"backend": "hf"})
    if cfg.backend != "vllm":
        return cfg
    if not available():
        log(f"--backend vllm: {MISSING}; generating with transformers instead")
        return cfg.model_copy(
            update={"backend": "hf", "tensor_parallel_size": 1, "data_parallel_size": 1}
        )
    models = (getattr(cfg, name, None) for name in ("model", "base", "edited"))
    gguf = next((m for m in models if isinstance(m, str) and is_gguf(m)), None)
    if gguf is not None:
        raise BadInputError(
            f"--backend vllm: {gguf} is a GGUF, which orthoedit runs with transformers or "
            "llama.cpp; pass --backend hf or --backend llama.cpp."
        )
    if cfg.data_parallel_size > 1 and find_spec("ray") is None:
        raise BadInputError(
            f"--data-parallel-size {cfg.data_parallel_size} runs vLLM replicas through Ray, "
            "which is not installed: pip install ray, or --data-parallel-size 1."
        )
    return cfg


def open_session(folder: Path, cfg, tok=None, log=None):
    """The session that answers for ``cfg`` (already ``resolved``): vLLM's with
    ``--backend vllm``, llama.cpp's with ``--backend llama.cpp`` (a GGUF), else transformers'
    (``Session.open``; ``log`` hears which dtype ``auto`` chose)."""
    if getattr(cfg, "backend", "hf") == "vllm":
        return VllmSession.open(folder, cfg, tok)
    if getattr(cfg, "backend", "hf") == "llama.cpp":
        from ..model.gguf import is_gguf
        from .llama_cpp import LlamaCppSession

        if not is_gguf(folder):
            raise BadInputError(f"--backend llama.cpp runs GGUF files; {folder} is not one.")
        return LlamaCppSession.open(folder, cfg, tok)
    return Session.open(folder, cfg, tok=tok, log=log)


def engine_args(folder: Path, cfg) -> dict:
    """``vllm.LLM``'s arguments for one replica of ``folder`` (dtype ``auto`` as on a GPU:
    the checkpoint's, ``runtime.precision``)."""
    from .precision import resolve_dtype

    return {
        "model": str(folder),
        "tokenizer": str(folder),
        "dtype": resolve_dtype(cfg.dtype, folder, "cuda").dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
    }


def _plain(outputs) -> list[tuple[list[int], list]]:
    """vLLM's request outputs as (answer ids, prompt log-probabilities: one {id: logprob} per
    prompt position, None at the first), picklable for Ray."""
    found = []
    for out in outputs:
        prompt = [
            None if d is None else {t: p.logprob for t, p in d.items()}
            for d in (out.prompt_logprobs or [])
        ]
        found.append((list(out.outputs[0].token_ids), prompt))
    return found


def _replicas(args: dict, n: int, gpus: int) -> list:
    """``n`` Ray actors, each holding one ``vllm.LLM`` on ``gpus`` GPUs."""
    import ray

    @ray.remote(num_gpus=gpus)
    class Replica:
        def __init__(self, args: dict):
            from vllm import LLM

            self.llm = LLM(**args)

        def generate(self, prompts: list, params) -> list:
            return _plain(self.llm.generate(prompts, params, use_tqdm=False))

    return [Replica.remote(args) for _ in range(n)]


def _generation_config(folder: Path):
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: transformers derives it from config.json
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))


@dataclass
class VllmSession:
    """A chat model served by vLLM in this process (one engine) or by Ray replicas."""

    folder: Path
    tok: object
    system: str | None
    stop: set[int]
    vocab_size: int
    repetition_penalty: float
    engines: list = field(default_factory=list)
    replicated: bool = False

    @classmethod
    def open(cls, folder: Path, cfg, tok=None) -> VllmSession:
        from transformers import AutoConfig

        tok = tok or load_tokenizer(folder, getattr(cfg, "template", None))
        generation = _generation_config(folder)
        vocab = AutoConfig.from_pretrained(folder).get_text_config().vocab_size
        args = engine_args(folder, cfg)
        if cfg.data_parallel_size > 1:
            engines = _replicas(args, cfg.data_parallel_size, cfg.tensor_parallel_size)
        else:
            from vllm import LLM

            engines = [LLM(**args)]
        return cls(
            folder,
            tok,
            getattr(cfg, "system", None),
            stop_ids(None, tok, generation),
            vocab,
            generation.repetition_penalty or 1.0,
            engines,
            cfg.data_parallel_size > 1,
        )

    def _run(self, rows: list[list[int]], params) -> list[tuple[list[int], list]]:
        prompts = [{"prompt_token_ids": list(row)} for row in rows]
        if not self.replicated:
            return _plain(self.engines[0].generate(prompts, params, use_tqdm=False))
        import ray

        n = len(self.engines)
        shares = [list(range(k, len(prompts), n)) for k in range(n)]
        work = [(engine, share) for engine, share in zip(self.engines, shares, strict=True)]
        work = [(engine, share) for engine, share in work if share]
        futures = [e.generate.remote([prompts[i] for i in share], params) for e, share in work]
        found: list = [None] * len(prompts)
        for (_, share), results in zip(work, ray.get(futures), strict=True):
            for i, result in zip(share, results, strict=True):
                found[i] = result
        return found

    def complete(self, rows: list[list[int]], new_tokens: int, progress=None) -> list[list[int]]:
        """Greedy completions of token rows, at most ``new_tokens`` each."""
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=new_tokens,
            stop_token_ids=sorted(self.stop),
            repetition_penalty=self.repetition_penalty,
            detokenize=False,
        )
        made = [ids for ids, _ in self._run(rows, params)]
        if progress:
            progress(len(rows))
        return made

    def surprisal(self, rows: list[list[int]], completions: list[list[int]]) -> list[float]:
        """Mean nats per token of each completion after its row; empty completions give 0."""
        from vllm import SamplingParams

        out = [0.0] * len(rows)
        which = [i for i, done in enumerate(completions) if done]
        if not which:
            return out
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        found = self._run([rows[i] + completions[i] for i in which], params)
        for i, (_, logprobs) in zip(which, found, strict=True):
            start, done = len(rows[i]), completions[i]
            picked = [logprobs[start + j][token] for j, token in enumerate(done)]
            out[i] = -sum(picked) / len(done)
        return out

    def close(self) -> None:
        """Stop the engines and let their memory go (the next model may need it)."""
        if self.replicated:
            import ray

            for engine in self.engines:
                ray.kill(engine)
        self.engines = []
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
