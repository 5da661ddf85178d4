"""A model's own refusal openings: the shortest prefixes of its greedy refusals that read as
refusals ("I'm sorry", "As an AI"), derived from short answers (``FILTER_TOKENS``), read
back from a measure folder, or given as ``--refusal-tokens``. ``runtime.scores.refusal_score``
scores them teacher-forced."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import BadInputError
from ..folders import MeasureFolder
from .phrases import opening_refusal

# The filter's generation budget: enough for an opening refusal phrase (the judgement reads
# the opening of a short answer), short enough to run on every train and validation prompt.
FILTER_TOKENS = 16

# The longest refusal opening looked for: enough for "I'm sorry, but I can't" in any tokenizer.
MAX_OPENING = 8


def refusal_openings(
    tok, harmful: list[list[int]], harmless: list[list[int]], log
) -> list[tuple[int, ...]]:
    """The token sequences that open this model's refusals, from its own greedy completions
    (token ids) of harmful and harmless validation prompts.

    A completion's opening is its shortest prefix (at most ``MAX_OPENING`` tokens) that reads
    as a refusal, e.g. ``I'm sorry`` or ``As an AI``. No opening is a prefix of another, so
    their teacher-forced probabilities add up to the probability that an answer opens as a
    refusal (``refusal_score``). Kept: openings of at least 5% of the refusals that open
    fewer than 20% of the harmless answers.
    """
    refusing = [c for c in harmful if c and opening_refusal(tok.decode(c))]
    if not refusing:
        raise BadInputError(
            "the model refused none of the harmful validation prompts, so its refusal openings "
            "cannot be derived; pass --refusal-tokens (e.g. 'I,Sorry') or other prompts."
        )
    found = Counter()
    for c in refusing:
        k = next(
            (
                k
                for k in range(1, min(len(c), MAX_OPENING) + 1)
                if opening_refusal(tok.decode(c[:k]))
            ),
            None,
        )
        if k is not None:
            found[tuple(c[:k])] += 1

    def opens(o: tuple[int, ...]) -> int:
        return sum(tuple(c[: len(o)]) == o for c in harmless)

    keep = [
        o
        for o, n in found.most_common()
        if n >= max(1, 0.05 * len(refusing)) and opens(o) < 0.2 * max(1, len(harmless))
    ]
    if not keep:
        raise BadInputError(
            "the model's refusals have no common opening that its harmless answers lack; pass "
            "--refusal-tokens explicitly."
        )
    covered = sum(found[o] for o in keep)
    log(
        f"refusal openings {[tok.decode(o) for o in keep]} (open {covered} of the "
        f"{len(refusing)} refusals among {len(harmful)} harmful validation completions)"
    )
    return keep


def refusal_tokens(tok, harmful: list[list[int]], harmless: list[list[int]], log) -> list[int]:
    """Token ids that open this model's refusals: the first tokens of ``refusal_openings``, for
    scores that read the first generated token only."""
    return first_tokens(refusal_openings(tok, harmful, harmless, log))


def measured_refusal_openings(tok, direction_path: Path) -> list[tuple[int, ...]] | None:
    """The refusal openings of the measure run that wrote the direction (``scores.json`` beside
    it; its ``refusal_tokens`` as one-token openings where it has no ``refusal_openings``), as
    ids of this tokenizer; None when there is no such file."""
    path = MeasureFolder.of(direction_path).scores
    if not path.is_file():
        return None
    try:
        scores = json.loads(path.read_text())
        written = scores.get("refusal_openings") or [[t] for t in scores["refusal_tokens"]]
        openings = [[str(t) for t in o] for o in written]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise BadInputError(f"{path}: cannot read its refusal openings ({err}).") from None
    ids = [tok.convert_tokens_to_ids(o) if o else [] for o in openings]
    if not openings or any(
        not o
        or any(i is None or tok.convert_ids_to_tokens(i) != t for t, i in zip(o, io, strict=True))
        for o, io in zip(openings, ids, strict=True)
    ):
        raise BadInputError(
            f"{path}: refusal openings {openings!r} are not tokens of this model's tokenizer; "
            "pass --refusal-tokens."
        )
    return [tuple(o) for o in ids]


def first_tokens(openings: list[tuple[int, ...]]) -> list[int]:
    """The distinct first tokens of ``openings``, for scores that read the first token only."""
    return list(dict.fromkeys(o[0] for o in openings))


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
