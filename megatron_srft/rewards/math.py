"""The ``math`` reward: math-verify on the boxed answer, after ``</think>`` when the template asks for thinking.

score(response, answer) = 1 if the last ``\\boxed{...}`` (or ``\\fbox{...}``) in the answer part of the response
is mathematically equal to the reference under math-verify (fractions, LaTeX forms, sets, ...), else 0.
The answer part is the text after the last ``</think>`` when ``require_think`` (0 if the tag is missing: a
response that never closes its thinking has no answer); otherwise the whole response. A response without a
complete boxed answer scores 0.
"""

from __future__ import annotations

import functools
from typing import Optional

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _boxed_at(text: str, start: int) -> Optional[str]:
    """Contents of the braces opening at or after ``start`` (balanced, nested braces allowed); None if unbalanced."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "\\":  # an escaped brace \{ or \} does not open or close a group
            continue
        if c == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None


def extract_boxed(text: str) -> Optional[str]:
    """The contents of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``: the last box to open,
    so the innermost of nested boxes; braces nested inside it are kept, escaped braces ``\\{ \\}`` do not count."""
    best_pos, best = -1, None
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd + "{")
        pos2 = text.rfind(cmd + " {")
        pos = max(pos, pos2)
        while pos >= 0:
            inner = _boxed_at(text, pos + len(cmd))
            if inner is not None:
                if pos > best_pos:
                    best_pos, best = pos, inner
                break
            # an unclosed box (e.g. cut off by the length limit): try the previous one
            pos = max(text.rfind(cmd + "{", 0, pos), text.rfind(cmd + " {", 0, pos))
    return best


def answer_part(response: str, require_think: bool) -> Optional[str]:
    """The text after the last ``</think>`` when ``require_think`` (None if there is none), else ``response``."""
    if not require_think:
        return response
    if THINK_CLOSE not in response:
        return None
    return response.rsplit(THINK_CLOSE, 1)[1]


def _normalise(s: str) -> str:
    return " ".join(s.strip().split())


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str):
    """Parsed reference answer; cached because a group scores the same answer G + D times (parsing costs ms)."""
    from math_verify import parse  # lazy: it pulls in sympy (seconds); `srft config` reads REWARDS without it

    return parse("\\boxed{" + answer + "}")


def math_score(response: str, answer: str, *, require_think: bool = False) -> float:
    """1.0 if the extracted boxed answer verifies against ``answer`` (math-verify), else 0.0."""
    part = answer_part(response, require_think)
    if part is None:
        return 0.0
    pred = extract_boxed(part)
    if pred is None or not pred.strip():
        return 0.0
    if _normalise(pred) == _normalise(answer):  # quick path; also covers answers sympy cannot parse
        return 1.0
    from math_verify import parse, verify  # imported lazily: it pulls in sympy (seconds)

    gold = _parse_gold(answer)
    target = parse("\\boxed{" + pred + "}")
    if not gold or not target:
        return 0.0
    return 1.0 if verify(gold, target) else 0.0
