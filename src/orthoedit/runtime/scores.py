"""Scores read off a model's logits, shared by every stage: first-token log-probabilities,
the log-odds of refusal tokens or openings (teacher-forced), and the KL between two
models' first tokens (docs/design.md §7: everything in log-odds)."""

from __future__ import annotations

import torch

from .batching import batched_forward


@torch.no_grad()
def first_token_logprobs(model, rows: list[list[int]], batch_size: int, pad: int) -> torch.Tensor:
    """``[len(rows), vocab]`` float32 log-probabilities of the first generated token (the
    template prefix shared by all rows runs once: see ``runtime.batched_forward``)."""
    parts: dict[int, torch.Tensor] = {}
    # Only the last position's logits: the unembedding of every position is most of the cost
    # of a small model with a large vocabulary.
    for batch, output in batched_forward(model, rows, batch_size, pad, logits_to_keep=1):
        logits = output.logits[:, -1].float()
        for i, row in zip(batch, torch.log_softmax(logits, -1).cpu(), strict=True):
            parts[i] = row
    return torch.stack([parts[i] for i in range(len(rows))])


def log_odds(logprobs: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per prompt: log(p / (1 - p)), p = probability mass on the refusal tokens."""
    p = logprobs[:, token_ids].double().exp().sum(-1).clamp(1e-12, 1 - 1e-12)
    return torch.log(p) - torch.log1p(-p)


def mean_kl(base: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(base ‖ other) over prompts, from log-probabilities."""
    base, other = base.double(), other.double()
    return float((base.exp() * (base - other)).sum(-1).mean())


@torch.no_grad()
def refusal_score(
    model,
    rows: list[list[int]],
    openings: list[tuple[int, ...]],
    batch_size: int,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, log_odds)``: first-token log-probabilities ``[len(rows), vocab]`` and, per
    row, the log-odds that the answer opens with one of ``openings``, teacher-forced (each
    row runs once per opening, with the opening but its last token appended)."""
    longest = max(len(o) for o in openings)
    wide = [row + list(o[:-1]) for row in rows for o in openings]
    logp = torch.empty(len(wide), dtype=torch.float64)
    first: dict[int, torch.Tensor] = {}
    for batch, output in batched_forward(
        model, wide, batch_size, pad, keep=longest, logits_to_keep=longest
    ):
        logits = torch.log_softmax(output.logits.float(), -1).cpu()
        for j, i in enumerate(batch):
            o = openings[i % len(openings)]
            steps = logits[j, longest - len(o) :]
            logp[i] = steps.gather(1, torch.tensor(o)[:, None]).double().sum()
            if i % len(openings) == 0:
                first[i // len(openings)] = steps[0]
    p = logp.view(len(rows), len(openings)).logsumexp(-1).exp().clamp(1e-12, 1 - 1e-12)
    odds = torch.log(p) - torch.log1p(-p)
    return torch.stack([first[i] for i in range(len(rows))]), odds
