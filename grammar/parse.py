"""Surgery text -> :class:`RuleSet`, with every mistake reported in words.

``parse(text, path)`` runs lark's LALR parser over ``surgery.lark``, builds the
rule IR with :class:`BuildRules`, then checks it against the method signatures
(:mod:`surgeon.grammar.check`, reading the table the method registry fills). Syntax errors do not stop the work: the broken
statement is blanked out (offsets kept) and its piece parsed again, so one run
reports every error of a file.

The text is parsed in pieces of about ``_PIECE_CHARS`` characters, cut between
top-level statements and blocks: an error re-parses one piece, not the file, and
no parse tree outlives its piece, so time and memory grow linearly with the file.
Before any parsing, the file's size is bounded (``MAX_TEXT_BYTES``) and only
regular files are read (a named pipe would block for ever).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import stat
from pathlib import Path
from typing import Mapping

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from surgeon.diagnostics import Diagnostic, RulesError, Span
from surgeon.grammar import rules as ir
from surgeon.grammar._build import BuildRules, TooDeep, assemble
from surgeon.grammar._scan import CONTROL_CHAR, Lines, Scan, blank_all, pieces, scan, spaces
from surgeon.grammar.check import check_rules
from surgeon.grammar.limits import MAX_DEPTH, MAX_TEXT_BYTES, size_words
from surgeon.grammar.signature import MethodSignature

__all__ = ["parse", "load_rules", "parse_unchecked", "TERMINAL_WORDS", "KEYWORDS"]

KEYWORDS = (
    "match", "where", "apply", "skip", "train", "adapter", "merge", "type", "role", "name", "and", "or", "not", "in", "true",
    "false",
)

# How each terminal is named in a diagnostic ("expected a quoted glob, ...").
TERMINAL_WORDS = {
    "STRING": "a quoted string",
    "REGEX": 'a regex (re"...")',
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "COMPARE": "a comparison (== != < <= > >=)",
    "RANGE": "'..'",
    "EQUALS": "'='",
    "COMMA": "','",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "COMMENT": "a comment",
    "WS": "white space",
    "NAME_TEST": "'name'",
    "ROLE_NAME": "a role (attn.q, mlp.*, ...)",
    **{k.upper(): f"'{k}'" for k in KEYWORDS if k != "name"},
}
_VALUE_TERMINALS = {"INT", "FLOAT", "STRING", "TRUE", "FALSE", "LSQB"}
# Order in which expected terminals are listed: the likeliest fix first.
_ORDER = [
    "APPLY", "SKIP", "TRAIN", "WHERE", "MATCH", "ADAPTER", "MERGE", "STRING", "REGEX", "TYPE", "ROLE", "ROLE_NAME", "NAME", "NAME_TEST", "NOT",
    "LPAR", "INT", "FLOAT", "TRUE", "FALSE", "LSQB", "COMPARE", "IN", "RANGE", "EQUALS", "AND", "OR", "COMMA",
    "RPAR", "RSQB", "LBRACE", "RBRACE", "_NL", "$END",
]

_MAX_ERRORS = 50  # syntax errors reported before the rest of the file is left unparsed
_PIECE_CHARS = 16_384  # small enough that a piece parses quickly, large enough to hold any real rule
_SHOWN_CHARS = 1000  # of a source line under a diagnostic; a longer line is cut there


class _ContinueInBrackets:
    """Post-lexer: a newline inside '(' or '[' does not end the statement."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for token in stream:
            if token.type in ("LPAR", "LSQB"):
                depth += 1
            elif token.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif token.type == "_NL" and depth:
                continue
            yield token


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark.open(
        "surgery.lark",
        rel_to=__file__,
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=_ContinueInBrackets(),
        cache=False,
    )


# --- public entry points -------------------------------------------------------


def parse(text: str, path: str | None = None, methods: Mapping[str, MethodSignature] | None = None) -> ir.RuleSet:
    """Parse and check surgery text. Raises :class:`RulesError` listing every error."""
    if len(text) > MAX_TEXT_BYTES:
        raise RulesError(_too_large(path, Span.at(text, MAX_TEXT_BYTES), "the rules text is longer than"))
    with _no_cycle_collection():
        rule_set, diagnostics = parse_unchecked(text, path)
        checked, more = check_rules(rule_set, methods)
    diagnostics = sorted(_located(diagnostics + more, text, path), key=_order)
    errors = [d for d in diagnostics if d.is_error]
    if errors:
        raise RulesError(diagnostics)
    return ir.RuleSet(checked.adapters, path=path, warnings=tuple(diagnostics), source=text, merges=checked.merges)


def load_rules(path: str | Path, methods: Mapping[str, MethodSignature] | None = None) -> ir.RuleSet:
    """Read a ``.surgery`` file (UTF-8, a regular file of at most ``MAX_TEXT_BYTES``) and :func:`parse` it."""
    name = str(path)
    data = _read(Path(path), name)
    if len(data) > MAX_TEXT_BYTES:
        line = data.count(b"\n", 0, MAX_TEXT_BYTES) + 1
        column = MAX_TEXT_BYTES - (data.rfind(b"\n", 0, MAX_TEXT_BYTES) + 1) + 1
        span = Span(line, column, line, column + 1, MAX_TEXT_BYTES, MAX_TEXT_BYTES + 1)
        raise RulesError(_too_large(name, span, "the file is larger than"))
    return parse(decode(data, name), name, methods)


def _read(path: Path, name: str) -> bytes:
    """The file's bytes, at most MAX_TEXT_BYTES + 1 of them; a folder, pipe, device or socket is refused unread."""
    try:
        # O_NONBLOCK: opening a named pipe with no writer returns at once (then fstat refuses it) instead of waiting
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise RulesError(Diagnostic("io", f"no such rules file: {name}", file=name)) from None
    except IsADirectoryError:
        raise RulesError(Diagnostic("io", f"{name} is a folder, not a rules file", file=name)) from None
    except OSError as exc:
        raise RulesError(Diagnostic("io", f"cannot read {name}: {exc.strerror}", file=name)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise RulesError(Diagnostic("io", f"{name} is a folder, not a rules file", file=name))
        if not stat.S_ISREG(mode):
            kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            raise RulesError(Diagnostic(
                "io", f"{name} is {kind}, not a regular file: rules are read from files", file=name,
                hint="reading a pipe or a device may never end; save the rules to a file and check that"))
        chunks, size = [], 0
        while size <= MAX_TEXT_BYTES:  # never more than the limit and one byte, whatever the file says its size is
            chunk = os.read(fd, MAX_TEXT_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise RulesError(Diagnostic("io", f"cannot read {name}: {exc.strerror}", file=name)) from None
    finally:
        os.close(fd)


def _too_large(name: str | None, span: Span, what: str) -> Diagnostic:
    return Diagnostic(
        "too-large", f"{what} {size_words(MAX_TEXT_BYTES)}, the most surgeon reads", span,
        f"checking takes about a second per MB; some 100,000 rules fit in {size_words(MAX_TEXT_BYTES)}: "
        "split the rules into several files, or select many modules with one glob", file=name)


def decode(data: bytes, name: str | None = None) -> str:
    """UTF-8 bytes -> text (a leading byte-order mark is dropped)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8")
        span = Span.at(good + "?", len(good))
        line = data.split(b"\n")[span.line - 1].decode("utf-8", errors="replace")
        raise RulesError(
            Diagnostic(
                "encoding",
                f"the file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
                span,
                "save the rules file as UTF-8",
                file=name,
                source_line=line,
            )
        ) from None


def parse_unchecked(text: str, path: str | None = None) -> tuple[ir.RuleSet, list[Diagnostic]]:
    """Syntax only: the rule set of the parts that parse, and the syntax diagnostics."""
    layout, lines = scan(text), Lines(text)
    diagnostics: list[Diagnostic] = []
    broken: list = []  # (start, end) of the statements left out
    for begin in layout.unterminated:
        diagnostics.append(_unterminated(text, begin, lines))
        broken.append(layout.line_at(begin, text))
    for bracket, statement in layout.unclosed:
        diagnostics.append(_unclosed(text, bracket, lines))
        broken.append(statement)
    for problem in layout.problems:
        diagnostics.append(Diagnostic(problem.code, problem.message, lines.span(problem.start, problem.end), problem.hint))
        broken.append(layout.statement_at(problem.start))
    work = blank_all(text, broken, layout)
    statements, syntax = [], []
    for start, end in pieces(layout, len(work), _PIECE_CHARS):
        if len(syntax) >= _MAX_ERRORS:
            break
        built, found = _parse_piece(text, work, (start, end), layout, lines, _MAX_ERRORS - len(syntax))
        statements += built
        syntax += found
    adapters, merges = assemble(statements)
    return ir.RuleSet(tuple(adapters), path=path, merges=tuple(merges)), diagnostics + syntax


def _parse_piece(text: str, work: str, piece_at: tuple, layout: Scan, lines: "Lines", budget: int) -> tuple[list, list]:
    """(the statements of ``work[start:end]``, its syntax diagnostics, at most ``budget`` of them)."""
    start, end = piece_at
    piece, diagnostics = work[start:end], []
    builder = BuildRules(lines.line_of(start) - 1, start)
    while len(diagnostics) < budget:
        try:
            return builder.build(_parser().parse(piece + "\n")), diagnostics
        except UnexpectedInput as exc:
            diagnostics.append(_syntax_error(exc, text, piece_at, lines))
            at = start + (min(_error_pos(exc, piece), len(piece) - 1) if piece else 0)
        except TooDeep as deep:
            diagnostics.append(Diagnostic("too-deep", f"this expression is nested more than {MAX_DEPTH} levels deep",
                                          deep.span, "split the condition into several rules"))
            at = deep.span.start
        blank_start, blank_end = layout.extent(*layout.statement_at(at), len(work))
        blank_start, blank_end = max(blank_start, start) - start, min(blank_end, end) - start
        blanked = piece[:blank_start] + spaces(piece[blank_start:blank_end]) + piece[blank_end:]
        if blanked == piece:  # nothing left to blank: give up on the rest of the piece
            break
        piece = blanked
    return [], diagnostics


@contextlib.contextmanager
def _no_cycle_collection():
    """Python's cycle collector off while a file is parsed and checked.

    The rule IR is millions of small acyclic objects; as they pile up, each collection walks all
    of them again, which made 100,000 rules take twice as long as ten times 10,000. Reference
    counting frees everything as usual; collection resumes (as it was) when the file is done.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _order(d: Diagnostic):
    return (d.span.start if d.span else -1, d.severity != "error")


def _located(diagnostics: list[Diagnostic], text: str, path: str | None) -> list[Diagnostic]:
    # Attach the file name and the source line each diagnostic points at.
    lines = text.split("\n")
    out = []
    for d in diagnostics:
        source = d.source_line
        if source is None and d.span is not None and d.span.line <= len(lines):
            source = _shown(lines[d.span.line - 1], d.span)
        out.append(Diagnostic(d.code, d.message, d.span, d.hint, d.severity, path, source))
    return out


def _shown(line: str, span: Span) -> str | None:
    """The source line as shown under a diagnostic: control characters as '?', cut after _SHOWN_CHARS
    (None when the caret would fall past the cut: the location alone is given)."""
    line = CONTROL_CHAR.sub("?", line)
    if len(line) <= _SHOWN_CHARS:
        return line
    return line[:_SHOWN_CHARS] + " ..." if span.column <= _SHOWN_CHARS else None


# --- syntax errors ------------------------------------------------------------------


def _error_pos(exc: UnexpectedInput, text: str) -> int:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        return len(text.rstrip())
    return exc.pos_in_stream if exc.pos_in_stream is not None else len(text)


def _unterminated(text: str, begin: int, lines: Lines) -> Diagnostic:
    end = text.find("\n", begin)
    end = len(text) if end < 0 else end
    kind = "regex" if text.startswith("re", begin) else "string"
    return Diagnostic(
        "unterminated-string",
        f"unterminated {kind}: the closing '\"' is missing",
        lines.span(begin, end),
        "strings end on the line they start; write \\\" for a quote inside a string",
    )


def _unclosed(text: str, bracket: int, lines: Lines) -> Diagnostic:
    closing = {"(": ")", "[": "]"}[text[bracket]]
    return Diagnostic(
        "unclosed-bracket",
        f"'{text[bracket]}' is never closed",
        lines.span(bracket),
        f"close it with '{closing}'; a statement continues on the next line only while a bracket is open",
    )


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    if token.type in ("STRING", "REGEX"):
        return f"string {token.value}"
    if token.type in ("INT", "FLOAT"):
        return f"number {token.value}"
    if token.type == "NAME":
        return f"name '{token.value}'"
    if token.value in KEYWORDS:
        return f"keyword '{token.value}'"
    return f"'{token.value}'"


def _expected_words(expected: set[str]) -> str:
    expected = set(expected) - {"COMMENT", "WS"}
    words = []
    if _VALUE_TERMINALS <= expected:
        words.append("a value (number, string, true, false or [list])")
        expected -= _VALUE_TERMINALS
    rank = {name: i for i, name in enumerate(_ORDER)}
    words += [TERMINAL_WORDS.get(t, t) for t in sorted(expected, key=lambda t: (rank.get(t, 99), t))]
    if len(words) <= 1:
        return words[0] if words else "something else"
    return ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_error(exc: UnexpectedInput, text: str, piece_at: tuple, lines: Lines) -> Diagnostic:
    """The diagnostic of a lark error in the piece ``text[start:end]``."""
    start, end = piece_at
    if isinstance(exc, UnexpectedCharacters):
        pos = start + exc.pos_in_stream
        char = text[pos]
        hint = 'strings, globs and adapter names use double quotes: "..."' if char == "'" else None
        return Diagnostic("syntax", f"unexpected character {char!r}", lines.span(pos), hint)
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    # accepts() replays the parser, so LALR's merged look-aheads do not leak into the message.
    expected = set(exc.interactive_parser.accepts()) if exc.interactive_parser else set(exc.expected)
    if token.type == "$END":
        span = lines.span(start + len(text[start:end].rstrip()))
    elif token.type == "_NL":
        span = lines.span(start + token.start_pos)
    else:
        span = lines.span(start + token.start_pos, start + token.end_pos)
    message = f"unexpected {_describe(token)}; expected {_expected_words(expected)}"
    return Diagnostic("syntax", message, span, _syntax_hint(token, expected))


def _syntax_hint(token: Token, expected: set[str]) -> str | None:
    if token.type == "NAME" and "STRING" in expected and "REGEX" in expected:
        return f'globs are quoted: match "{token.value}" (or "*.{token.value}" at any depth)'
    if token.type == "EQUALS" and "COMPARE" in expected:
        return "compare with '==', not '='"
    if {"APPLY", "SKIP", "TRAIN"} <= expected:
        return "a rule ends with its action: apply METHOD(...), skip or train"
    if token.type == "RBRACE":
        return "this '}' closes no adapter block"
    if "RBRACE" in expected and token.type == "$END":
        return "close the adapter block with '}'"
    if token.type == "LBRACE" and "STRING" in expected:
        return 'name the adapter in quotes: adapter "NAME" { ... }'
    if token.type == "NAME" and "STRING" in expected:
        return f'name the adapter in quotes: adapter "{token.value}" {{ ... }}'
    return None
