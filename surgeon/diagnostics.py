"""Diagnostics: what surgeon tells a user about a mistake, and where.

Every error a user can cause is a :class:`SurgeryError` carrying one or more
:class:`Diagnostic` records. A diagnostic renders like a compiler's::

    rules.surgery:3:42: error: unknown method 'lroa'
      match "*.q_proj" apply lroa(r=8)
                             ^^^^
    hint: did you mean 'lora'? (methods: lora)

and as JSON with a stable schema (:meth:`Diagnostic.to_json`):
``{file, line, column, end_column, severity, code, message, hint}``.
Lines and columns are 1-based; ``end_column`` is exclusive.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

__all__ = [
    "Span",
    "Diagnostic",
    "SurgeryError",
    "RulesError",
    "ModelError",
    "PlanError",
    "FoldError",
    "closest",
    "render",
]


@dataclass(frozen=True, order=True, slots=True)  # slots: a 100k-rule file holds a million spans
class Span:
    """A region of source text: 1-based line/column, end exclusive, plus offsets."""

    line: int
    column: int
    end_line: int
    end_column: int
    start: int = 0
    end: int = 0

    @staticmethod
    def at(text: str, start: int, end: int | None = None) -> "Span":
        """The span of ``text[start:end]`` (one character when ``end`` is None)."""
        end = start + 1 if end is None else end
        line = text.count("\n", 0, start) + 1
        column = start - (text.rfind("\n", 0, start) + 1) + 1
        end_line = text.count("\n", 0, end) + 1
        end_column = end - (text.rfind("\n", 0, end) + 1) + 1
        return Span(line, column, end_line, end_column, start, end)

    def sub(self, offset: int, length: int) -> "Span":
        """A span inside a one-line span, ``offset`` characters after its start."""
        start = self.start + offset
        column = self.column + offset
        return Span(self.line, column, self.line, column + max(length, 1), start, start + max(length, 1))


@dataclass(frozen=True)
class Diagnostic:
    """One finding: an error (the file is rejected) or a warning (it is not)."""

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"
    file: str | None = None
    source_line: str | None = field(default=None, compare=False)

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def to_json(self) -> dict:
        span = self.span
        return {
            "file": self.file,
            "line": span.line if span else None,
            "column": span.column if span else None,
            "end_column": _end_column(span) if span else None,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
        }

    def render(self) -> str:
        """The compiler-style text: location, message, source line, caret, hint."""
        where = self.file
        if self.span is not None:
            where = f"{where or '<rules>'}:{self.span.line}:{self.span.column}"
        lines = [f"{where + ': ' if where else ''}{self.severity}: {self.message}"]
        if self.span is not None and self.source_line is not None:
            source, column = _window(self.source_line.rstrip("\r\n"), self.span.column)
            lines.append("  " + source)
            lines.append("  " + _caret(source, column, column + _end_column(self.span) - self.span.column))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


_SHOWN = 1000  # characters of a source line under a diagnostic: a megabyte line is not printed whole


def _window(source: str, column: int) -> tuple:
    """At most _SHOWN characters of ``source`` around ``column``, and the column within them."""
    if len(source) <= _SHOWN:
        return source, column
    start = max(0, min(column - 1 - _SHOWN // 2, len(source) - _SHOWN))
    return source[start : start + _SHOWN], column - start


def _end_column(span: Span) -> int:
    # A span over several lines is underlined to the end of its first line.
    if span.end_line != span.line:
        return span.column + 1
    return max(span.end_column, span.column + 1)


def _caret(source: str, column: int, end_column: int) -> str:
    # Copy tabs from the source so the carets line up however tabs are shown.
    prefix = "".join("\t" if ch == "\t" else " " for ch in source[: column - 1])
    if column - 1 > len(source):
        prefix += " " * (column - 1 - len(source))
    width = max(1, min(end_column, len(source) + 2) - column)
    return prefix + "^" * width


def render(diagnostics: Iterable[Diagnostic]) -> str:
    return "\n".join(d.render() for d in diagnostics)


class SurgeryError(Exception):
    """The one error type users see. ``diagnostics`` lists every finding."""

    def __init__(self, diagnostics: Sequence[Diagnostic] | Diagnostic | str, hint: str | None = None):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic("error", diagnostics, hint=hint)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(render(self.diagnostics))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]


class RulesError(SurgeryError):
    """A rules file (or text) that is not valid surgery."""


class ModelError(SurgeryError):
    """A model that cannot be opened or captured."""


class PlanError(SurgeryError):
    """Rules that do not fit the model they are applied to."""


class FoldError(SurgeryError):
    """Folding changed what the model computes, or cannot be done."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The choices that look most like ``word`` (for "did you mean" hints)."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[f] for f in found]
