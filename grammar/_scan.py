"""A character-level scan of surgery text that needs no grammar.

The parser uses it to recover from syntax errors (blank out the broken
statement and parse again), to find unterminated strings and unclosed
brackets, which lark alone would report confusingly, and to refuse what no
rules file holds before lark sees it: a string longer than
``MAX_LITERAL_CHARS``, a name or number longer than ``MAX_WORD_CHARS`` (every
number then converts: Python refuses integers of more than 4,300 digits) and
control characters. One regular expression finds everything the scan looks at
(quotes, comments, brackets, newlines, over-long words, control characters),
so the text between them costs no Python.

It also holds the text arithmetic the parser's recovery needs: offsets to lines
(``Lines``), the pieces a file is parsed in (``pieces``) and blanking (``blank_all``).
"""

from __future__ import annotations

import array
import bisect
import functools
import re
from dataclasses import dataclass, field

from surgeon.diagnostics import Span
from surgeon.grammar.limits import MAX_LITERAL_CHARS, MAX_WORD_CHARS

__all__ = ["Scan", "Problem", "scan", "source_lines", "Lines", "pieces", "blank_all", "spaces", "CONTROL_CHAR"]

_OPEN = {"(": ")", "[": "]"}
_CLOSE = {")": "(", "]": "["}
_CONTROL = "\x00-\x08\x0b\x0e-\x1f\x7f"  # C0 controls and DEL, but tab, newline, form feed and carriage return
_LEXEME = re.compile(
    r'(?P<string>(?:re)?"(?:[^"\\\n]|\\[^\n])*)(?P<close>")?'
    r"|#[^\n]*"
    rf"|(?P<word>(?<![A-Za-z0-9_])[A-Za-z0-9_]{{{MAX_WORD_CHARS + 1},}})"
    rf"|(?P<control>[{_CONTROL}])"
    r"|[()\[\]{}\n]"
)
CONTROL_CHAR = re.compile(f"[{_CONTROL}]")
_STATEMENT_START = re.compile(r"[ \t]*(?:(?:match|adapter)\b|\})")


@dataclass(frozen=True)
class Problem:
    """Something no rules file holds, found before parsing: the statement holding it is left out."""

    code: str
    message: str
    start: int
    end: int
    hint: str


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
    problems: list = field(default_factory=list)  # Problem, in text order
    brace_opens: list = field(default_factory=list)  # the keys of ``braces``, sorted

    def statement_at(self, pos: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.statements, (pos, float("inf"))) - 1
        if i >= 0 and self.statements[i][0] <= pos < self.statements[i][1]:
            return self.statements[i]
        return self.statements[-1] if self.statements else (0, 0)

    def line_at(self, pos: int, text: str) -> tuple[int, int]:
        """(start, end) of the physical line holding ``pos``, newline included."""
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        return start, len(text) if end < 0 else end + 1

    def extent(self, start: int, end: int, length: int) -> tuple[int, int]:
        """What blanking ``start:end`` must blank: the blocks it opens too; to the end (``length``) if one is never closed."""
        opens = self.brace_opens
        while True:
            inside = opens[bisect.bisect_left(opens, start):bisect.bisect_left(opens, end)]
            further = max((self.braces[b] + 1 for b in inside), default=end)
            if further <= end:
                break
            end = further
        unclosed = self.unclosed_braces  # in text order
        if bisect.bisect_left(unclosed, end) > bisect.bisect_left(unclosed, start):
            end = length  # a block that is never closed: nothing after it can be trusted
        return start, end


@functools.lru_cache(maxsize=4)
def source_lines(text: str) -> list:
    """``text`` split at newlines, kept for the last few texts: diagnostics quote a line each."""
    return text.split("\n")


def _starts_statement(text: str, pos: int) -> bool:
    return _STATEMENT_START.match(text, pos) is not None


def scan(text: str) -> Scan:
    result = Scan()
    stack: list[int] = []  # offsets of open '(' / '['
    braces: list[int] = []
    start, n = 0, len(text)
    for m in _LEXEME.finditer(text):
        i, ch = m.start(), text[m.start()]
        if m.group("string") is not None:
            _check_string(m, result)
            continue
        if m.group("word") is not None:
            result.problems.append(Problem(
                "too-long", f"this name or number is {m.end() - i:,} characters long; at most {MAX_WORD_CHARS} are allowed",
                i, m.end(), "no method argument, field or number needs that many characters"))
        elif m.group("control") is not None:
            result.problems.append(_control(ch, i))
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
    if start < n:
        result.statements.append((start, n))
    result.unclosed += [(p, (start, n)) for p in stack]
    result.unclosed_braces = braces
    result.brace_opens = sorted(result.braces)
    return result


def _check_string(m: re.Match, result: Scan) -> None:
    begin, end = m.start(), m.end()
    if m.group("close") is None:
        result.unterminated.append(begin)
    elif end - begin > MAX_LITERAL_CHARS:
        result.problems.append(Problem(
            "too-long", f"this string is {end - begin:,} characters long; strings and regexes are at most "
            f"{MAX_LITERAL_CHARS:,}", begin, end, "no module path is that long: shorten the glob or regex"))
    control = CONTROL_CHAR.search(m.string, begin, end)
    if control is not None:
        result.problems.append(_control(control.group(), control.start()))


def _control(ch: str, pos: int) -> Problem:
    return Problem("control-character", f"control character U+{ord(ch):04X} in the rules text", pos, pos + 1,
                   "a rules file is plain text: remove it (write \\t or \\n inside a string)")


def pieces(layout: Scan, length: int, size: int) -> list:
    """(start, end) of pieces of about ``size`` characters, each a run of whole top-level statements and blocks."""
    found, start, end = [], 0, 0
    for s, e in layout.statements:
        if s < end:  # inside a block (or its recovery extent)
            continue
        if end - start >= size:
            found.append((start, end))
            start = end
        end = layout.extent(s, e, length)[1]
    if end > start:
        found.append((start, end))
    return found


def spaces(text: str) -> str:
    """``text`` blanked: every character but newlines a space, so offsets, lines and columns stay."""
    return re.sub(r"[^\n]", " ", text)


def blank_all(text: str, ranges: list, layout: Scan) -> str:
    """``text`` with each range (and the blocks it opens) blanked out, newlines kept: one pass, however many."""
    spans = sorted(layout.extent(s, e, len(text)) for s, e in ranges)
    out, at = [], 0
    for s, e in spans:
        s = max(s, at)
        if e > s:
            out += [text[at:s], spaces(text[s:e])]
            at = e
    return "".join(out) + text[at:]


class Lines:
    """Offsets -> lines and columns in O(log n) (Span.at counts from the start of the text each time)."""

    def __init__(self, text: str):
        self.newlines = array.array("q", (m.start() for m in re.finditer("\n", text)))  # 8 bytes a line

    def line_of(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def column_of(self, pos: int, line: int) -> int:
        return pos - (self.newlines[line - 2] + 1 if line > 1 else 0) + 1

    def span(self, start: int, end: int | None = None) -> Span:
        end = start + 1 if end is None else end
        line, end_line = self.line_of(start), self.line_of(end)
        return Span(line, self.column_of(start, line), end_line, self.column_of(end, end_line), start, end)
