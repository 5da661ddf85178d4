"""Choosing among candidate directions (DESIGN idea 7: everything in log-odds).

Refusal is the probability mass on refusal tokens at the first generated position, as
log-odds. Refusal tokens come from the model's own refusals: the first tokens of its greedy
completions of harmful prompts that read as refusals. Each candidate is scored on validation
prompts: **bypass** (harmful prompts, candidate ablated exactly as ``apply`` would edit it),
**induce** (harmless prompts, candidate added at its layer) and **KL** (first-token KL on
harmless prompts under the ablation). Candidates are filtered (KL budget, induce > 0, depth)
and the lowest bypass wins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .direction import Direction
from .errors import BadInputError, CheckFailedError
from .hooks import addition_hooks, plan_hooks
from .measure import left_padded, length_sorted_batches
from .plan import build_plan

# Openings that read as refusals in English chat models (checked case-insensitively near the
# start of a completion); they decide which completions count, not which token ids are used.
REFUSAL_PHRASES = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "sorry",
    "i apologize",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "as an ai",
    "i must decline",
    "i refuse",
    "cannot help",
    "can't help",
    "can't assist",
    "cannot assist",
    "not able to help",
    "won't help",
    "unable to",
)


def reads_as_refusal(text: str) -> bool:
    head = text.strip().lower().replace("’", "'")[:80]
    return any(phrase in head for phrase in REFUSAL_PHRASES)


@torch.no_grad()
def first_token_logprobs(model, rows: list[list[int]], batch_size: int, pad: int) -> torch.Tensor:
    """``[len(rows), vocab]`` float32 log-probabilities of the first generated token."""
    device = next(model.parameters()).device
    parts: dict[int, torch.Tensor] = {}
    for batch in length_sorted_batches([len(r) for r in rows], batch_size):
        enc = left_padded([rows[i] for i in batch], pad, device)
        logits = model(**enc, use_cache=False).logits[:, -1].float()
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
def greedy_first_tokens(model, rows, batch_size: int, pad: int, new_tokens: int = 12):
    """(first token id, decoded-later token ids) of short greedy completions."""
    device = next(model.parameters()).device
    result: dict[int, list[int]] = {}
    for batch in length_sorted_batches([len(r) for r in rows], batch_size):
        enc = left_padded([rows[i] for i in batch], pad, device)
        enc.pop("position_ids")  # generate derives them from the mask
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)[
            :, enc["input_ids"].shape[1] :
        ]
        for i, row in zip(batch, ids.cpu().tolist(), strict=True):
            result[i] = row
    return [result[i] for i in range(len(rows))]


def refusal_tokens(model, tok, harmful_rows, harmless_rows, batch_size: int, pad: int, log):
    """Token ids that open this model's refusals, derived from its own completions."""
    harmful = greedy_first_tokens(model, harmful_rows, batch_size, pad)
    harmless = greedy_first_tokens(model, harmless_rows, batch_size, pad)
    refusing = [c for c in harmful if c and reads_as_refusal(tok.decode(c))]
    if not refusing:
        raise BadInputError(
            "the model refused none of the harmful validation prompts, so its refusal tokens "
            "cannot be derived; pass --refusal-tokens (e.g. 'I,Sorry') or other prompts."
        )
    starts = Counter(c[0] for c in refusing)
    benign = Counter(c[0] for c in harmless if c)
    keep = [
        t
        for t, n in starts.most_common()
        if n >= max(1, 0.05 * len(refusing)) and benign[t] < 0.2 * max(1, len(harmless))
    ]
    if not keep:
        raise BadInputError(
            "the model's refusals open with the same tokens as its answers to harmless prompts; "
            "pass --refusal-tokens explicitly."
        )
    log(
        f"refusal tokens {tok.convert_ids_to_tokens(keep)} (from {len(refusing)} of "
        f"{len(harmful)} harmful validation completions that read as refusals)"
    )
    return keep


def parse_refusal_tokens(tok, spec: str) -> list[int]:
    ids = []
    for piece in (p for p in spec.split(",") if p):
        encoded = tok(piece, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise BadInputError(
                f"--refusal-tokens: {piece!r} is {len(encoded)} tokens for this tokenizer; "
                "give single tokens."
            )
        ids.append(encoded[0])
    return ids


@dataclass
class Score:
    layer: int
    position: int
    bypass: float
    induce: float
    kl: float
    kept: bool = True
    why: list[str] = field(default_factory=list)


@dataclass
class Selection:
    chosen: Score
    scores: list[Score]
    baseline: dict[str, float]
    refusal_token_ids: list[int]
    thresholds: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "chosen": asdict(self.chosen),
            "baseline": self.baseline,
            "refusal_token_ids": self.refusal_token_ids,
            "thresholds": self.thresholds,
            "scores": [asdict(s) for s in self.scores],
        }


def select(
    *,
    model,
    table,
    checkpoint,
    config: dict,
    folder: Path,
    candidates: torch.Tensor,
    harmful_rows: list[list[int]],
    harmless_rows: list[list[int]],
    token_ids: list[int],
    batch_size: int,
    pad: int,
    max_kl: float,
    max_layer_frac: float,
    progress: Callable[[int], None] | None = None,
) -> Selection:
    """Score every candidate ``candidates[layer, position index]`` and choose one."""
    n_layers, n_pos, _ = candidates.shape
    n_harmful = len(harmful_rows)
    both = harmful_rows + harmless_rows  # one batched pass scores bypass and KL together
    base = first_token_logprobs(model, both, batch_size, pad)
    baseline = {
        "harmful_log_odds": float(log_odds(base[:n_harmful], token_ids).mean()),
        "harmless_log_odds": float(log_odds(base[n_harmful:], token_ids).mean()),
    }
    scores = []
    largest = float(candidates.double().norm(dim=-1).max())
    for layer in range(n_layers):
        for p in range(n_pos):
            r = candidates[layer, p].double()
            if float(r.norm()) <= 1e-6 * largest:  # e.g. the embedding of a fixed template token
                scores.append(
                    Score(
                        layer,
                        p - n_pos,
                        float("nan"),
                        float("nan"),
                        float("nan"),
                        kept=False,
                        why=["no difference between the means"],
                    )
                )
                if progress:
                    progress(1)
                continue
            direction = Direction(r.numpy(), Path("<candidate>"), "", "single")
            plan = build_plan(
                table=table,
                checkpoint=checkpoint,
                config=config,
                direction=direction,
                source=str(folder),
            )
            with plan_hooks(model, plan, checkpoint):
                ablated = first_token_logprobs(model, both, batch_size, pad)
            with addition_hooks(model, table, layer, r.float()):
                added = first_token_logprobs(model, harmless_rows, batch_size, pad)
            score = Score(
                layer=layer,
                position=p - n_pos,
                bypass=float(log_odds(ablated[:n_harmful], token_ids).mean()),
                induce=float(log_odds(added, token_ids).mean()),
                kl=mean_kl(base[n_harmful:], ablated[n_harmful:]),
            )
            if score.kl > max_kl:
                score.why.append(f"KL {score.kl:.3g} > {max_kl}")
            if score.induce <= 0:
                score.why.append(f"induce {score.induce:.3g} <= 0")
            if layer >= max_layer_frac * n_layers:
                score.why.append(f"layer {layer} >= {max_layer_frac:.0%} of depth")
            score.kept = not score.why
            scores.append(score)
            if progress:
                progress(1)
    kept = [s for s in scores if s.kept]
    scored = [s for s in scores if s.bypass == s.bypass]  # not NaN
    thresholds = {"max_kl": max_kl, "max_layer_frac": max_layer_frac, "min_induce": 0.0}
    if not kept:
        best = min(scored, key=lambda s: s.bypass)
        raise CheckFailedError(
            f"no candidate passes the filters (lowest bypass: layer {best.layer}, position "
            f"{best.position}: {'; '.join(best.why)}); relax --max-kl or --max-layer-frac, or "
            "pick one with --layer/--position."
        )
    chosen = min(kept, key=lambda s: s.bypass)
    return Selection(chosen, scores, baseline, token_ids, thresholds)
