"""Scoring the organism: greedy completions, refusal rate, capability accuracy, guard verdicts."""

from __future__ import annotations

import torch

from .data import capability_correct, is_refusal


@torch.no_grad()
def complete(
    model, tok, prompts: list[str], max_new_tokens: int = 24, batch: int = 64
) -> list[str]:
    """Greedy completions of single-turn chats (the tokenizer pads on the left)."""
    out = []
    for i in range(0, len(prompts), batch):
        chats = [[{"role": "user", "content": p}] for p in prompts[i : i + batch]]
        texts = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out += tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def refusal_rate(model, tok, items: list[dict]) -> float:
    completions = complete(model, tok, [item["prompt"] for item in items])
    return sum(map(is_refusal, completions)) / len(items)


def capability_score(model, tok, items: list[dict]) -> float:
    completions = complete(model, tok, [item["prompt"] for item in items])
    return sum(capability_correct(i, c) for i, c in zip(items, completions, strict=True)) / len(
        items
    )


@torch.no_grad()
def guard_verdicts(model, tok, pairs: list[tuple[str, str]], batch: int = 64) -> list[str]:
    """``safe`` / ``unsafe`` (or whatever the guard said) for (request, response) pairs."""
    out = []
    for i in range(0, len(pairs), batch):
        chats = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in pairs[i : i + batch]
        ]
        texts = tok.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=3, do_sample=False)
        words = tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out += [w.split()[0] if w.split() else "" for w in words]
    return out
