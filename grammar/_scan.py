"""A character-level scan of surgery text that needs no grammar.

The parser uses it to recover from syntax errors (blank out the broken
statement and parse again) and to find unterminated strings and unclosed
brackets, which lark alone would report confusingly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Scan", "scan"]

_OPEN = {"(": ")", "[": "]"}
_CLOSE = {")": "(", "]": "["}


@dataclass
class Scan:
    # (start, end) offsets of each logical statement: a line, continued while '(' or '[' is open.
    statements: list = field(default_factory=list)
    # offsets of '"' (or of 're"') that open a string never closed on its line.
    unterminated: list = field(default_factory=list)
    # offset of '{' -> offset of its matching '}' (absent when never closed).
    braces: dict = field(default_factory=dict)
    # offsets of '{' never closed.
    unclosed_braces: list = field(default_factory=list)
    # (offset of a '(' or '[' never closed, the statement it spoils). A line that
    # begins with 'match', 'adapter' or '}' starts a new statement even inside
    # brackets, so a missing ')' spoils one statement, not the rest of the file.
    unclosed: list = field(default_factory=list)

    def statement_at(self, pos: int) -> tuple[int, int]:
        for start, end in self.statements:
            if start <= pos < end:
                return start, end
        return self.statements[-1] if self.statements else (0, 0)

    def line_at(self, pos: int, text: str) -> tuple[int, int]:
        """(start, end) of the physical line holding ``pos``, newline included."""
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        return start, len(text) if end < 0 else end + 1



_STATEMENT_START = re.compile(r"[ \t]*(?:(?:match|adapter)\b|\})")


def _starts_statement(text: str, pos: int) -> bool:
    return _STATEMENT_START.match(text, pos) is not None


def scan(text: str) -> Scan:
    result = Scan()
    stack: list[int] = []  # offsets of open '(' / '['
    braces: list[int] = []
    start = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            begin = i - 2 if text[max(0, i - 2):i] == "re" else i
            i += 1
            while i < n and text[i] not in '"\n':
                i += 2 if text[i] == "\\" and i + 1 < n and text[i + 1] != "\n" else 1
            if i >= n or text[i] == "\n":
                result.unterminated.append(begin)
                continue
        elif ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        elif ch in _OPEN:
            stack.append(i)
        elif ch in _CLOSE:
            if stack and text[stack[-1]] == _CLOSE[ch]:
                stack.pop()
        elif ch == "{":
            braces.append(i)
        elif ch == "}":
            if braces:
                result.braces[braces.pop()] = i
        elif ch == "\n" and not stack:
            result.statements.append((start, i + 1))
            start = i + 1
        elif ch == "\n" and _starts_statement(text, i + 1):
            result.statements.append((start, i + 1))
            result.unclosed += [(p, (start, i + 1)) for p in stack]
            stack = []
            start = i + 1
        i += 1
    if start < n:
        result.statements.append((start, n))
    result.unclosed += [(p, (start, n)) for p in stack]
    result.unclosed_braces = braces
    return result
