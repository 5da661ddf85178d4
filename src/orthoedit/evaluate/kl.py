"""Cheap damage metrics, base vs edited, on harmless prompts: ``orthoedit eval kl``.

* **First-token KL**: KL(base ‖ edited) of the first generated token's distribution, averaged
  over prompts (the number ``measure`` filters candidates on).
* **Cross-entropy**: each model's mean per-token cross-entropy on the *base* model's greedy
  answers to the same prompts; the increase is how much less likely the edited model finds
  what the base model would have said.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import EvalKLConfig
from ..errors import BadInputError
from ..model.source import resolve_model
from ..output import check_file_target, inputs_of, write_file
from ..prompts import prompt_texts
from ..runtime.session import (
    batched_forward,
    chat_ids,
    load_tokenizer,
    pad_id,
    post_instruction_ids,
    run_dtype,
    start_stage,
)


@dataclass
class DamageReport:
    prompts: int
    first_token_kl: float
    cross_entropy_base: float
    cross_entropy_edited: float
    answer_tokens: int

    @property
    def cross_entropy_delta(self) -> float:
        return self.cross_entropy_edited - self.cross_entropy_base

    def to_dict(self) -> dict:
        return {
            "prompts": self.prompts,
            "first_token_kl": self.first_token_kl,
            "cross_entropy": {
                "base": self.cross_entropy_base,
                "edited": self.cross_entropy_edited,
                "delta": self.cross_entropy_delta,
            },
            "answer_tokens": self.answer_tokens,
        }


@torch.no_grad()
def cross_entropy(model, rows, answers, batch_size: int, pad: int) -> float:
    """Mean per-token cross-entropy (nats) of ``answers`` following ``rows``."""
    full = [r + a for r, a in zip(rows, answers, strict=True)]
    keep = max(map(len, answers)) + 1
    total, count = 0.0, 0
    for batch, output in batched_forward(model, full, batch_size, pad, keep=keep):
        logp = torch.log_softmax(output.logits.double(), -1)
        for j, i in enumerate(batch):
            n = len(answers[i])
            target = torch.tensor(answers[i], device=logp.device)
            # logits at position t predict token t + 1: the last n + 1 positions, minus one
            picked = logp[j, -n - 1 : -1].gather(-1, target[:, None])
            total -= float(picked.sum())
            count += n
    return total / count


def _prompts(cfg: EvalKLConfig) -> list[str]:
    items = prompt_texts(cfg.prompts, "harmless", "test", column=cfg.column, split=cfg.split)
    return random.Random(cfg.seed).sample(items, min(cfg.n, len(items)))


def eval_kl(cfg: EvalKLConfig, log: Callable[[str], None] = print) -> DamageReport:
    from ..runtime.scores import first_token_logprobs, mean_kl
    from ..runtime.session import Session, generate

    start_stage(cfg.device)
    if cfg.report is not None:
        check_file_target(cfg.report, inputs_of(cfg), cfg.overwrite)
    folders = {
        name: resolve_model(m, None)[0] for name, m in (("base", cfg.base), ("edited", cfg.edited))
    }
    tok = load_tokenizer(folders["base"])
    if load_tokenizer(folders["edited"]).get_vocab() != tok.get_vocab():
        raise BadInputError("the two models' tokenizers differ; KL needs the same vocabulary.")
    post = post_instruction_ids(tok, cfg.system)
    prompts = _prompts(cfg)
    rows = chat_ids(tok, prompts, post, cfg.system)
    pad = pad_id(tok)
    first, ce, answers = {}, {}, None
    for name in ("base", "edited"):
        log(f"{name}: {len(rows)} prompts")
        session = Session.open(folders[name], cfg, tok=tok, log=log)
        model = session.model
        first[name] = first_token_logprobs(model, rows, cfg.batch_size, pad)
        if answers is None:  # the base's answers, scored under both
            answers = [g.ids for g in generate(session, rows, cfg.max_new_tokens)]
        ce[name] = cross_entropy(model, rows, answers, cfg.batch_size, pad)
        session.close()
        del model
    report = DamageReport(
        prompts=len(rows),
        first_token_kl=mean_kl(first["base"], first["edited"]),
        cross_entropy_base=ce["base"],
        cross_entropy_edited=ce["edited"],
        answer_tokens=sum(map(len, answers)),
    )
    if cfg.report is not None:
        record = {"base": cfg.base, "edited": cfg.edited, **report.to_dict()}
        record["dtype"] = run_dtype(folders["base"], cfg)
        write_file(cfg.report, json.dumps(record, indent=2) + "\n")
    return report
