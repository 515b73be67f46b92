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
* a value with a power whose exponent, or a factorial whose argument, is above :data:`MAX_EXPONENT`,
  or with a part beyond 10^±:data:`MAX_DIGITS`, raises :class:`TooLarge` instead of being evaluated
  exactly, and :func:`verify` drops it rather than compare it: "9^{9^{9^9}}" would take longer than any
  alarm, which cannot interrupt one big-integer operation.

Any other error math-verify or SymPy raises reads as "no value" or "not equal".
"""

from __future__ import annotations

import re
import threading

MAX_CHARS = 2000
TIMEOUT_S = 2
MAX_EXPONENT = 1000
MAX_DIGITS = 1000  # a number beyond 10^1000 (or a non-zero one below 10^-1000) is no answer
# A plain decimal number: SymPy reads it exactly (math-verify reads "1e3" as 1 and drops a leading "+").
_PLAIN = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?(?:/\d+)?")


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
    """math-verify's ``verify`` (gold first: it is not symmetric) of the values within the bounds (a value
    holding a power tower is dropped, not compared), bounded; False on any error."""
    gold, target = [v for v in gold if _within_bounds(v)], [v for v in target if _within_bounds(v)]
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


def _magnitude(node):
    """``abs(node)`` to 15 digits (0 for a non-finite value): SymPy's floating evaluation, cheap once the
    node's parts are within the bounds."""
    approx = abs(node.evalf(15))
    return approx if approx.is_finite else 0


def _size(node):
    """How far a number is from 1 either way: ``max(|x|, 1/|x|)``, 0 for zero or a non-finite value."""
    approx = _magnitude(node)
    return max(approx, 1 / approx) if approx else 0


def _check_bounds(value) -> None:
    """Raise :class:`TooLarge` unless every power's exponent and factorial's argument is at most
    :data:`MAX_EXPONENT` in size and every part of ``value`` lies within 10^±:data:`MAX_DIGITS` (zero
    aside). Parts are checked inner first, so no check evaluates a part that has not passed; after it,
    evaluating ``value`` exactly handles at most some thousand digits."""
    import sympy

    limit = sympy.Float(f"1e{MAX_DIGITS}")
    for node in sympy.postorder_traversal(value):
        if not node.is_number:
            continue
        if isinstance(node, sympy.Pow) and _magnitude(node.exp) > MAX_EXPONENT:
            raise TooLarge(f"exponent {str(node.exp)[:40]} is above {MAX_EXPONENT} in size")
        if isinstance(node, sympy.factorial) and _magnitude(node.args[0]) > MAX_EXPONENT:
            raise TooLarge(f"factorial of {str(node.args[0])[:40]} is above {MAX_EXPONENT}")
        if _size(node) > limit:
            raise TooLarge(f"{str(node)[:40]} is beyond 10^±{MAX_DIGITS}")


def _within_bounds(value) -> bool:
    """Whether a parsed value (a number, a set, an equation...) passes :func:`_check_bounds` in every
    part; strings and matrices pass."""
    import sympy

    if not isinstance(value, sympy.Basic):
        return True
    try:
        _check_bounds(value)
    except Exception:  # TooLarge, or SymPy failing to evaluate a part
        return False
    return True


def _finite_real(value):
    """``value``, evaluated exactly, when it is one finite real number within the bounds, else None
    (:class:`TooLarge` raised beyond them)."""
    if not is_number(value):
        return None
    try:
        _check_bounds(value)
        value = value.doit()
        return value if value.is_finite and value.is_extended_real else None
    except TooLarge:
        raise
    except Exception:  # SymPy's evaluation and assumptions raise on odd values
        return None


def is_plain(text: str) -> bool:
    """Whether ``text`` is a plain decimal number (an exponent of at most 3 digits), which
    :func:`read_number` reads exactly by SymPy."""
    return bool(_PLAIN.fullmatch(text.strip()))


def read_number(text: str | None):
    """The one finite real number a short answer text states, as an exact SymPy value, or None.

    A plain number ("1,200", "-3.5", "3/4", ".5", "1e3") is read exactly by SymPy; anything else is read by
    math-verify as LaTeX ("\\frac12", "\\frac{\\sqrt{3}}{2}", "1{,}000", "\\$18"), inside ``$...$``, and
    evaluated exactly ("10^{3}" is 1000). None when it is not one finite real number (a set, an equation,
    a division by zero, no number). Raises :class:`TooLarge` for a number beyond the bounds (see the
    module docstring)."""
    import sympy

    text = (text or "").strip()
    if is_plain(text):
        try:
            value = sympy.Rational(text.replace(",", ""))
        except (ZeroDivisionError, TypeError, ValueError):
            return None
        _check_bounds(value)
        return value
    values = parse(text if "$" in text else f"${text}$")
    return _finite_real(values[0]) if values else None


def fraction(value) -> str | None:
    """A number as plain text "p" or "p/q" (what the gold checker's regexes read): a rational exactly,
    another value (sqrt(3)/2) as the exact fraction of its 17-digit approximation; None for None."""
    if value is None:
        return None
    if not value.is_Rational:
        import sympy

        value = sympy.Rational(value.evalf(17))
    return str(value.p) if value.q == 1 else f"{value.p}/{value.q}"


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
