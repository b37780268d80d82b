"""Grader operation math: whether an answer's final mathematical answer equals the reference's, by
Hugging Face's math-verify, as TRL's accuracy_reward and Open R1 grade MATH-style problems: both are
parsed to sympy (LaTeX or plain expressions) and compared symbolically and numerically, so 1/2, 0.5
and \\frac{2}{4} agree, as do (x+1)^2 and x^2+2x+1, sets, intervals and matrices."""

from __future__ import annotations

import threading
from functools import lru_cache

# math-verify bounds parsing and comparing by SIGALRM, which only the main thread can set: elsewhere
# (never in our runs so far) without a bound.
SECONDS = 5


def _seconds() -> int | None:
    return SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def _reference(text: str):
    """The reference parsed: a solution as written (its \\boxed{} answer, or LaTeX between $...$), or a
    bare answer ('\\frac{1}{2}', '(1, 2)', 'x^2'), read as LaTeX math."""
    from math_verify import parse  # noqa: PLC0415 - sympy only where math is graded

    written = any(mark in text for mark in ("$", "\\boxed", "\\[", "\\("))
    return parse(text if written else f"${text}$", extraction_mode="first_match", parsing_timeout=_seconds())


@lru_cache(maxsize=1)
def _answer_extraction() -> tuple:
    """How an answer's final answer is found (TRL's accuracy_reward's): \\boxed{} first, then LaTeX or a
    plain expression. Built once: equal runs for every sampled answer."""
    from latex2sympy2_extended import NormalizationConfig  # noqa: PLC0415
    from math_verify import ExprExtractionConfig, LatexExtractionConfig  # noqa: PLC0415

    latex = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False,
                                  normalization_config=NormalizationConfig(nits=False, malformed_operators=False,
                                                                           basic_latex=True, boxed="all", units=True))
    return (latex, ExprExtractionConfig())


def equal(answer: str, reference: str) -> bool:
    """Whether the answer's final answer (its \\boxed{} one first, else the last expression math-verify
    finds) equals the reference's; False where either has none math-verify can parse."""
    from math_verify import parse, verify  # noqa: PLC0415

    gold = _reference(reference)
    if not gold:
        return False
    got = parse(answer, extraction_config=list(_answer_extraction()), extraction_mode="first_match",
                parsing_timeout=_seconds())
    return bool(got) and verify(gold, got, timeout_seconds=_seconds())
