"""Handler of the math reward's worker processes (see procpool.py): standalone, no asyncrl.

`handle(gold, response, timeout_s)` returns ("ok", bool), ("timeout", why) or ("error", why).
"""

from math_verify import parse, verify
from math_verify.errors import TimeoutException


def init():
    """Run math-verify once: its LaTeX grammar and sympy caches load lazily."""
    verify(parse("$1$"), parse("$1$"))


def handle(gold, response, timeout_s):
    stage = "parsing the reference answer"
    try:
        gold_parsed = parse(gold, parsing_timeout=timeout_s, raise_on_error=True)
        if not gold_parsed:
            return "error", f"math-verify cannot parse the reference answer {gold[:80]!r}"
        stage = "parsing the response"
        parsed = parse(response, parsing_timeout=timeout_s, raise_on_error=True)
        if not parsed:
            return "ok", False  # nothing that reads as an answer: wrong, not undecided
        stage = "comparing"
        return "ok", bool(verify(gold_parsed, parsed, timeout_seconds=timeout_s,
                                 raise_on_error=True))
    except TimeoutException:
        return "timeout", f"math-verify exceeded verify_timeout_s={timeout_s}s while {stage}"
    except Exception as exc:  # a math-verify/sympy error: undecided, reported as such
        return "error", f"math-verify raised {type(exc).__name__} while {stage}: {exc}"[:300]
