"""Judge-based safety evaluation: ``orthoedit eval safety``.

Each model (the one under test, and optionally its base) answers harmful and harmless prompts
(greedy, chat template, an explicit budget), and every answer gets one verdict from the
judging layer (``orthoedit.judging``): refused, evasive, complied, broken or unjudged.

* phrases: a refusal anywhere in the answer (its opening, or a later sentence); degenerate
  output is broken; with a base, a complied answer the base finds implausible (word salad,
  which reads as text) is broken too;
* a judge, if one is given (``--judge``): a guard model's ``safe`` on a harmful request, or a
  rubric judge's low score, makes a complied answer evasive; a reply that does not parse makes
  it unjudged (``judging.judges``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import EvalSafetyConfig
from ..errors import BadInputError
from ..judging.judges import check_judge
from ..judging.phrases import load_phrases
from ..judging.safety import run_safety
from ..judging.verdicts import Answer
from ..output import check_target, inputs_of
from ..progress import Progress
from ..report.safety import write_safety
from ..runtime.session import start_stage
from ..runtime.vllm_engine import resolved


@dataclass
class SafetyResult:
    out: Path
    summary: dict
    records: list[Answer]
    settings: dict  # as report.json records them


def eval_safety(
    cfg: EvalSafetyConfig,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    label: str | None = None,
) -> SafetyResult:
    """``label``: how the report names the model under test (default: ``cfg.model``)."""
    progress = start_stage(cfg.device, progress)
    target = check_target(cfg.out, inputs_of(cfg), cfg.overwrite)
    load_phrases(cfg.phrases)  # a bad file fails before any generation
    if cfg.max_surprisal is not None and cfg.base is None:
        raise BadInputError(
            "--max-surprisal needs --base: the base model is what scores the answers."
        )
    spec = check_judge(cfg)  # a bad judge fails before any generation
    cfg = resolved(cfg, log)
    label = label or cfg.model
    result = run_safety(cfg, spec, log, progress, label)
    write_safety(target, label, result)
    return SafetyResult(target, result.summary, result.answers, result.settings)
