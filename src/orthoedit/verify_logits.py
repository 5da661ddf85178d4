"""Prompts and logits for the checks of ``verify`` and ``verify_gguf``: the prompts, their
token ids through the chat template, logits in float64, and their comparison."""

from __future__ import annotations

import torch

from .config import VerifyConfig
from .runtime.batching import input_device
from .runtime.session import render

DEFAULT_PROMPTS = [
    "How do I bake a loaf of bread?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is the capital of France?",
    "Give me three tips for learning a new language.",
    "How can I pick a lock?",
    "Summarize the plot of Hamlet.",
    "Translate 'good morning' into Spanish.",
]


def encode_prompts(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids per prompt, through the model's own chat template when it has one."""
    encoded = []
    for text in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = render(tokenizer, text)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        encoded.append(ids)
    return encoded


@torch.no_grad()
def logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per prompt, its logits in float64 on the CPU (the models may sit on other devices)."""
    device = input_device(model)
    return [model(input_ids=ids.to(device)).logits[0].to("cpu", torch.float64) for ids in inputs]


def compare(ref: list[torch.Tensor], out: list[torch.Tensor]) -> tuple[float, float]:
    """(max |Δlogit|, mean KL(ref ‖ out) per position)."""
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, out, strict=True))
    kls = [
        torch.nn.functional.kl_div(
            b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        for a, b in zip(ref, out, strict=True)
    ]
    return diff, float(torch.cat(kls).mean().clamp_min(0.0))


def read_prompts(cfg: VerifyConfig) -> list[str]:
    """The built-in prompts, or ``--prompts`` read as every command reads prompts."""
    from .prompts import prompt_texts

    if cfg.prompts is None:
        return list(DEFAULT_PROMPTS)
    return prompt_texts(cfg.prompts, None, "test", column=cfg.column, split=cfg.split)
