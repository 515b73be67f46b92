"""math-verify, bounded: the one wrapper through which the gold checks read numbers and compare them.

math-verify (HuggingFace, pinned in pyproject) turns answer text into SymPy values -- LaTeX
("\\frac12", "\\boxed{\\frac{1}{2}}", "1{,}000", "2\\sqrt{3}") and plain text ("1,000"; the right side
of "a + b = c") -- and its ``verify`` decides whether two values are equal (symbolically, or numerically
to 6 decimals). ``alignment.evaluation.gold`` (the ``number`` checker) and ``alignment.tasks_gym`` (the
lenient reasoning-gym check) both call it through this module only.

Bounds, so that no completion can stall training:

* text longer than :data:`MAX_CHARS` is not read (no value);
* each parse and each comparison runs under math-verify's timeout of :data:`TIMEOUT_S` seconds. That
  timeout is a SIGALRM, which works only in the main thread (math-verify raises elsewhere), so off the
  main thread it runs without one and the other bounds hold alone;
* a value holding a power whose exponent is not a plain number of at most :data:`MAX_EXPONENT` in size,
  or a factorial of more than :data:`MAX_EXPONENT`, raises :class:`TooLarge` instead of being evaluated:
  "9^{9^{9^9}}" would take longer than any alarm, which cannot interrupt one big-integer operation.

Any other error math-verify or SymPy raises reads as "no value" or "not equal".
"""

from __future__ import annotations

import re
import threading

MAX_CHARS = 2000
TIMEOUT_S = 2
MAX_EXPONENT = 1000
# A plain decimal number: SymPy reads it exactly (math-verify reads "1e3" as 1 and drops a leading "+").
_PLAIN = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?")


class TooLarge(ValueError):
    """A value (a tower of powers, a huge factorial) too large to evaluate within the bounds."""


def _timeout() -> int | None:
    """math-verify's timeout where its SIGALRM works (the main thread), else none."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse(text: str | None) -> list:
    """math-verify's ``parse`` of ``text`` (its values, SymPy first), bounded; [] when nothing is read."""
    if not text or len(text) > MAX_CHARS:
        return []
    from math_verify import parse as mv_parse

    try:
        return mv_parse(text, parsing_timeout=_timeout())
    except Exception:  # math-verify raises on odd input
        return []


def verify(gold: list, target: list) -> bool:
    """math-verify's ``verify`` (gold first: it is not symmetric), bounded; False on any error."""
    if not gold or not target:
        return False
    from math_verify import verify as mv_verify

    try:
        return bool(mv_verify(gold, target, timeout_seconds=_timeout()))
    except Exception:
        return False


def is_number(value) -> bool:
    """Whether a parsed value is a number (not a set, an equation, a string or a symbol)."""
    import sympy

    return isinstance(value, (int, float)) or (isinstance(value, sympy.Basic) and bool(value.is_number))


def _check_bounds(value) -> None:
    import sympy

    for node in sympy.preorder_traversal(value):
        if isinstance(node, sympy.Pow) and not (node.exp.is_Rational and abs(node.exp) <= MAX_EXPONENT):
            raise TooLarge(f"exponent {str(node.exp)[:40]} is not a number of at most {MAX_EXPONENT}")
        if isinstance(node, sympy.factorial) and not (node.args[0].is_Integer and node.args[0] <= MAX_EXPONENT):
            raise TooLarge(f"factorial of {str(node.args[0])[:40]} is above {MAX_EXPONENT}")


def _finite_real(value):
    """``value`` when it is one finite real number within the bounds, else None (:class:`TooLarge` raised)."""
    if not is_number(value):
        return None
    _check_bounds(value)
    try:
        return value if value.is_finite and value.is_extended_real else None
    except Exception:  # SymPy's assumptions raise on odd values
        return None


def is_plain(text: str) -> bool:
    """Whether ``text`` is a plain decimal number, which :func:`read_number` reads exactly by SymPy."""
    return bool(_PLAIN.fullmatch(text.strip()))


def read_number(text: str | None):
    """The one finite real number a short answer text states, as an exact SymPy value, or None.

    A plain number ("1,200", "-3.5", "3/4", ".5", "1e3") is read exactly by SymPy; anything else is read by
    math-verify as LaTeX ("\\frac12", "\\frac{\\sqrt{3}}{2}", "1{,}000", "\\$18"), inside ``$...$``.
    None when it is not one finite real number (a set, an equation, a division by zero, no number).
    Raises :class:`TooLarge` for a number beyond the bounds (see the module docstring)."""
    import sympy

    text = (text or "").strip()
    if is_plain(text):
        try:
            return sympy.Rational(text.replace(",", ""))
        except (ZeroDivisionError, TypeError, ValueError):
            return None
    values = parse(text if "$" in text else f"${text}$")
    return _finite_real(values[0]) if values else None


def same_number(expected, got, tolerance: float) -> bool:
    """Whether two numbers (from :func:`read_number`) are equal: math-verify's ``verify`` holds, or
    ``abs(got - expected) <= max(tolerance, 1e-9 * max(abs(got), abs(expected)))`` (computed exactly by
    SymPy, so "10000000000.5" is within 1e-9 of 10000000000 although math-verify's rounding says no)."""
    if verify([expected], [got]):
        return True
    import sympy

    try:
        bound = sympy.Max(sympy.Float(tolerance), sympy.Float(1e-9) * sympy.Max(abs(got), abs(expected)))
        return bool(abs(got - expected) <= bound)
    except Exception:  # an undecidable comparison
        return False
