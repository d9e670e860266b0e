"""Globs over dotted module paths, translated to regular expressions.

The whole path must match. ``*`` matches any run of characters, dots included
(so ``"*.q_proj"`` finds ``q_proj`` at any depth); ``?`` matches one character;
``[0-9]`` and ``[!0-9]`` are character classes; ``{a,b}`` is alternation and
may nest (``"*.{self_attn.{q,v},mlp.up}_proj"``); a backslash makes the next
character literal.
"""

from __future__ import annotations

import functools
import re

__all__ = ["GlobError", "compile_glob", "glob_to_regex"]


class GlobError(ValueError):
    """A malformed glob; ``offset`` is the index of the offending character."""

    def __init__(self, message: str, offset: int, length: int = 1):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.length = length


def glob_to_regex(pattern: str) -> str:
    """The regular expression (without anchors) that ``pattern`` stands for."""
    regex, end = _translate(pattern, 0, depth=0)
    if end != len(pattern):  # only a stray '}' or ',' at depth 0 stops the scan early
        raise GlobError("unmatched '}' in glob", end)
    return regex


@functools.lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern:
    return re.compile(glob_to_regex(pattern), re.DOTALL)


def _translate(pattern: str, i: int, depth: int) -> tuple[str, int]:
    """Translate from ``i`` until the end, or (inside braces) an unescaped ',' or '}'."""
    out: list[str] = []
    n = len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "\\":
            if i + 1 == n:
                raise GlobError("glob ends with a lone backslash", i)
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "[":
            cls, i = _char_class(pattern, i)
            out.append(cls)
            continue
        elif ch == "{":
            alternatives, i = _alternation(pattern, i, depth)
            out.append(alternatives)
            continue
        elif ch == "}":
            if depth == 0:
                raise GlobError("unmatched '}' in glob", i)
            return "".join(out), i
        elif ch == "," and depth > 0:
            return "".join(out), i
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out), i


def _alternation(pattern: str, start: int, depth: int) -> tuple[str, int]:
    options: list[str] = []
    i = start + 1
    while True:
        option, i = _translate(pattern, i, depth + 1)
        options.append(option)
        if i >= len(pattern):
            raise GlobError("unclosed '{' in glob", start)
        if pattern[i] == "}":
            return "(?:" + "|".join(options) + ")", i + 1
        i += 1  # a ','


def _char_class(pattern: str, start: int) -> tuple[str, int]:
    i = start + 1
    negate = i < len(pattern) and pattern[i] in "!^"
    if negate:
        i += 1
    body_start = i
    # A ']' right after '[' (or '[!') is a literal member, as in shells.
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 1
    if i >= len(pattern):
        raise GlobError("unclosed '[' in glob", start)
    body = pattern[body_start:i]
    members = []
    for j, ch in enumerate(body):
        if ch == "-" and 0 < j < len(body) - 1:
            members.append("-")
        else:
            members.append(re.escape(ch))
    try:
        regex = "[" + ("^" if negate else "") + "".join(members) + "]"
        re.compile(regex)
    except re.error as exc:
        raise GlobError(f"bad character class in glob: {exc.msg}", start, i + 1 - start) from None
    return regex, i + 1
