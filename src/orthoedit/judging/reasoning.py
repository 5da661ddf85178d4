"""Answers of reasoning models: the reasoning block (``<think>…</think>``) apart from the
final answer, which is what is judged. Reasoning that never closes within the budget is
``unfinished``: the model gave no answer, and that is counted apart (a broken verdict), never
as compliance or refusal."""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.session import THINKING_TAGS


@dataclass(frozen=True)
class Reasoned:
    answer: str  # the final answer (the whole text when there is no reasoning block)
    reasoning: str | None  # the reasoning block's text, None when there is none
    unfinished: bool = False  # the block opened and never closed


def opened_block(prompt_text: str) -> str | None:
    """The opening tag a rendered prompt leaves open at its end (a template that starts the
    answer inside a reasoning block), or None."""
    for opening, closing in THINKING_TAGS:
        if prompt_text.rfind(opening) > prompt_text.rfind(closing):
            return opening
    return None


def split_reasoning(text: str, opened: str | None = None) -> Reasoned:
    """``text``: a decoded answer; ``opened``: the tag the prompt left open (the answer then
    starts inside the block)."""
    for opening, closing in THINKING_TAGS:
        inside = opened == opening
        start = 0 if inside else text.find(opening)
        if start < 0 or (not inside and text[:start].strip()):
            continue  # no block, or one that does not open the answer
        body_from = start if inside else start + len(opening)
        end = text.find(closing, body_from)
        if end < 0:
            return Reasoned("", text[body_from:].strip(), unfinished=True)
        return Reasoned(text[end + len(closing) :].strip(), text[body_from:end].strip())
    return Reasoned(text.strip(), None)
