"""The ``exact`` reward for synthetic tasks: the extracted final answer must equal the reference string.

The final answer is the last ``\\boxed{...}`` of the answer part (after ``</think>`` when ``require_think``);
both sides are compared after collapsing whitespace. No boxed answer scores 0.
"""

from __future__ import annotations

from .math import answer_part, extract_boxed


def exact_score(response: str, answer: str, *, require_think: bool = False) -> float:
    part = answer_part(response, require_think)
    if part is None:
        return 0.0
    pred = extract_boxed(part)
    if pred is None:
        return 0.0
    return 1.0 if " ".join(pred.split()) == " ".join(answer.split()) else 0.0
