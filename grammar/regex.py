"""Every regex match of surgeon, with a bound on its time: ``regex_fullmatch``.

A rules file's ``re"..."`` selectors, and the regexes PEFT configs hold (``target_modules``,
``rank_pattern`` keys, which surgeon turns into regex selectors with lookaheads), are written
by strangers. Python's ``re`` backtracks with no way to stop it: ``re"(a+)+$"`` against a long
module path runs for hours. Matching here runs on the ``regex`` package (a dependency of
transformers), whose engine accepts ``re``'s syntax, lookarounds included, defuses most
exponential patterns by itself and stops any match after ``REGEX_TIMEOUT`` seconds. A linear-time
engine (RE2, as ``google-re2``, which installs here) was weighed and not taken: it refuses lookaheads
and backreferences, which PEFT's patterns use, and its Python binding costs more per match than
``regex`` with a timeout.

The language is Python's ``re`` syntax: a pattern is validated by ``re`` (its messages and offsets
are the ones users know), nests groups at most ``MAX_DEPTH`` deep (``re`` recurses once a level),
then runs on ``regex``. Errors carry the offset of the offending character, so that callers can
point at it.
"""

from __future__ import annotations

import functools
import re

import regex as _engine

from surgeon.grammar.limits import MAX_DEPTH, REGEX_TIMEOUT

__all__ = ["RegexError", "RegexTimeout", "check_regex", "regex_fullmatch"]


class RegexError(ValueError):
    """A pattern that is not a valid regex (or one the engine does not support); ``offset`` may be None."""

    def __init__(self, message: str, offset: int | None = None):
        super().__init__(message)
        self.message, self.offset = message, offset


class RegexTimeout(RuntimeError):
    """A match that ran past its time bound: the pattern backtracks (nested repetition such as ``(a+)+``)."""

    def __init__(self, pattern: str, text: str, seconds: float):
        super().__init__(f"the regex took longer than {seconds:g} s to match {text!r}")
        self.pattern, self.text, self.seconds = pattern, text, seconds


def check_regex(pattern: str) -> None:
    """Raise RegexError if ``pattern`` is not valid (Python's syntax, nesting); return None if it is.

    The engine compiles it when it first matches (a pattern ``re`` accepts and the engine refuses, which
    is rare, is reported then, as RegexError): compiling takes three times as long as validating.
    """
    _validated(pattern)


def regex_fullmatch(pattern: str, text: str, timeout: float = REGEX_TIMEOUT) -> bool:
    """Does ``pattern`` (Python regex syntax) match the whole of ``text``?

    Raises RegexError for an invalid pattern and RegexTimeout when the match takes longer than
    ``timeout`` seconds. Compiled patterns are cached.
    """
    compiled = _compiled(pattern)
    try:
        return compiled.fullmatch(text, timeout=timeout) is not None
    except TimeoutError:
        raise RegexTimeout(pattern, text, timeout) from None


@functools.lru_cache(maxsize=1024)
def _validated(pattern: str) -> None:
    offset = _too_deep(pattern)
    if offset is not None:
        raise RegexError(f"groups in this regex nest more than {MAX_DEPTH} deep", offset)
    try:
        re.compile(pattern)
    except re.error as exc:
        raise RegexError(exc.msg, exc.pos) from None
    except (RecursionError, OverflowError, MemoryError) as exc:  # a pattern too large for re's compiler
        raise RegexError(f"the regex is too large to compile ({type(exc).__name__})") from None


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str):
    _validated(pattern)
    try:
        return _engine.compile(pattern)
    except _engine.error as exc:  # valid for re, refused by the engine
        raise RegexError(f"not supported: {exc.msg}", exc.pos) from None


def _too_deep(pattern: str) -> int | None:
    """The offset of the first '(' nested deeper than MAX_DEPTH (escapes and classes skipped), or None."""
    depth, i, n = 0, 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 1
        elif ch == "[":  # a class: ']' right after '[' or '[^' is a member
            i += 2 if pattern.startswith("[^", i) else 1
            if i < n and pattern[i] == "]":
                i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
        elif ch == "(":
            depth += 1
            if depth > MAX_DEPTH:
                return i
        elif ch == ")":
            depth = max(0, depth - 1)
        i += 1
    return None
