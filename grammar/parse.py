"""Surgery text -> :class:`RuleSet`, with every mistake reported in words.

``parse(text, path)`` runs lark's LALR parser over ``surgery.lark``, builds the
rule IR with :class:`_BuildRules`, then checks it against the method registry
(:mod:`surgeon.grammar.check`). Syntax errors do not stop the work: the broken
statement is blanked out (offsets kept) and the text parsed again, so one run
reports every error of a file.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import rules as ir
from ._build import BuildRules, span_of
from ._scan import Scan, scan
from .diagnostics import Diagnostic, RulesError, Span
from .signature import MethodSignature

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

_MAX_ERRORS = 50
_MAX_DEPTH = 100  # nesting of the parse tree; real rules files stay under 10


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
    from .check import check_rules

    rule_set, diagnostics = parse_unchecked(text, path)
    checked, more = check_rules(rule_set, methods)
    diagnostics = sorted(_located(diagnostics + more, text, path), key=_order)
    errors = [d for d in diagnostics if d.is_error]
    if errors:
        raise RulesError(diagnostics)
    return ir.RuleSet(checked.adapters, path=path, warnings=tuple(diagnostics), source=text, merges=checked.merges)


def load_rules(path: str | Path, methods: Mapping[str, MethodSignature] | None = None) -> ir.RuleSet:
    """Read a ``.surgery`` file (UTF-8) and :func:`parse` it."""
    path = Path(path)
    name = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RulesError(Diagnostic("io", f"no such rules file: {name}", file=name)) from None
    except IsADirectoryError:
        raise RulesError(Diagnostic("io", f"{name} is a folder, not a rules file", file=name)) from None
    except OSError as exc:
        raise RulesError(Diagnostic("io", f"cannot read {name}: {exc.strerror}", file=name)) from None
    return parse(decode(data, name), name, methods)


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
    layout = scan(text)
    diagnostics: list[Diagnostic] = []
    work = text
    for begin in layout.unterminated:
        diagnostics.append(_unterminated(text, begin))
        work = _blank(work, *layout.line_at(begin, text), layout)
    for bracket, statement in layout.unclosed:
        diagnostics.append(_unclosed(text, bracket))
        work = _blank(work, *statement, layout)
    tree = None
    for _ in range(_MAX_ERRORS):
        try:
            tree = _parser().parse(work + "\n")
            break
        except UnexpectedInput as exc:
            diagnostics.append(_syntax_error(exc, text))
            pos = min(_error_pos(exc, work), len(work) - 1) if work else 0
            blanked = _blank(work, *layout.statement_at(pos), layout)
            if blanked == work:  # nothing left to blank: give up on the rest
                break
            work = blanked
    if tree is None:
        return ir.RuleSet(path=path), diagnostics
    too_deep = _too_deep(tree)
    if too_deep is not None:
        diagnostics.append(
            Diagnostic(
                "too-deep",
                f"this expression is nested more than {_MAX_DEPTH} levels deep",
                span_of(too_deep.meta),
                "split the condition into several rules",
            )
        )
        return ir.RuleSet(path=path), diagnostics
    builder = BuildRules(text)
    try:
        adapters, merges = builder.transform(tree)
    except VisitError as exc:  # pragma: no cover - a bug in the builder, not in the user's text
        raise exc.orig_exc from None
    return ir.RuleSet(tuple(adapters), path=path, merges=tuple(merges)), diagnostics + builder.diagnostics


def _too_deep(tree):
    """The first subtree nested deeper than _MAX_DEPTH (the builder recurses), or None."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return node
        stack.extend((child, depth + 1) for child in node.children if hasattr(child, "children"))
    return None


def _order(d: Diagnostic):
    return (d.span.start if d.span else -1, d.severity != "error")


def _located(diagnostics: list[Diagnostic], text: str, path: str | None) -> list[Diagnostic]:
    # Attach the file name and the source line each diagnostic points at.
    lines = text.split("\n")
    out = []
    for d in diagnostics:
        source = d.source_line
        if source is None and d.span is not None and d.span.line <= len(lines):
            source = lines[d.span.line - 1]
        out.append(Diagnostic(d.code, d.message, d.span, d.hint, d.severity, path, source))
    return out


# --- syntax errors ------------------------------------------------------------------


def _blank(text: str, start: int, end: int, layout: Scan) -> str:
    """Replace a statement (and the block it opens, if any) with spaces, keeping offsets."""
    for brace, closing in layout.braces.items():
        if start <= brace < end:
            end = max(end, closing + 1)
    if any(start <= brace < end for brace in layout.unclosed_braces):
        end = len(text)  # a block that is never closed: nothing after it can be trusted
    return text[:start] + "".join(c if c == "\n" else " " for c in text[start:end]) + text[end:]


def _error_pos(exc: UnexpectedInput, text: str) -> int:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        return len(text.rstrip())
    return exc.pos_in_stream if exc.pos_in_stream is not None else len(text)


def _unterminated(text: str, begin: int) -> Diagnostic:
    end = text.find("\n", begin)
    end = len(text) if end < 0 else end
    kind = "regex" if text.startswith("re", begin) else "string"
    return Diagnostic(
        "unterminated-string",
        f"unterminated {kind}: the closing '\"' is missing",
        Span.at(text, begin, end),
        "strings end on the line they start; write \\\" for a quote inside a string",
    )


def _unclosed(text: str, bracket: int) -> Diagnostic:
    closing = {"(": ")", "[": "]"}[text[bracket]]
    return Diagnostic(
        "unclosed-bracket",
        f"'{text[bracket]}' is never closed",
        Span.at(text, bracket),
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


def _syntax_error(exc: UnexpectedInput, text: str) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        span = Span.at(text, exc.pos_in_stream)
        char = text[exc.pos_in_stream]
        hint = 'strings, globs and adapter names use double quotes: "..."' if char == "'" else None
        return Diagnostic("syntax", f"unexpected character {char!r}", span, hint)
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    # accepts() replays the parser, so LALR's merged look-aheads do not leak into the message.
    expected = set(exc.interactive_parser.accepts()) if exc.interactive_parser else set(exc.expected)
    if token.type == "$END":
        span = Span.at(text, len(text.rstrip()))
    elif token.type == "_NL":
        span = Span.at(text, token.start_pos)
    else:
        span = Span.at(text, token.start_pos, token.end_pos)
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
