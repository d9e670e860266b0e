"""Surgery text -> :class:`RuleSet`, with every mistake reported in words.

``parse(text, path)`` runs lark's LALR parser over ``surgery.lark``, builds the
rule IR with :class:`_BuildRules`, then checks it against the method registry
(:mod:`surgeon.grammar.check`). Syntax errors do not stop the work: the broken
statement is blanked out (offsets kept) and the text parsed again, so one run
reports every error of a file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Mapping

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import rules as ir
from ._scan import Scan, scan
from .diagnostics import Diagnostic, RulesError, Span
from .signature import MethodSignature

__all__ = ["parse", "load_rules", "parse_unchecked", "TERMINAL_WORDS", "KEYWORDS"]

KEYWORDS = (
    "match", "where", "apply", "skip", "train", "adapter", "type", "name", "and", "or", "not", "in", "true", "false",
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
    **{k.upper(): f"'{k}'" for k in KEYWORDS if k != "name"},
}
_VALUE_TERMINALS = {"INT", "FLOAT", "STRING", "TRUE", "FALSE", "LSQB"}
# Order in which expected terminals are listed: the likeliest fix first.
_ORDER = [
    "APPLY", "SKIP", "TRAIN", "WHERE", "MATCH", "ADAPTER", "STRING", "REGEX", "TYPE", "NAME", "NAME_TEST", "NOT",
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
    return ir.RuleSet(checked.adapters, path=path, warnings=tuple(diagnostics), source=text)


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
                _span(too_deep.meta),
                "split the condition into several rules",
            )
        )
        return ir.RuleSet(path=path), diagnostics
    builder = _BuildRules(text)
    try:
        adapters = builder.transform(tree)
    except VisitError as exc:  # pragma: no cover - a bug in the builder, not in the user's text
        raise exc.orig_exc from None
    return ir.RuleSet(tuple(adapters), path=path), diagnostics + builder.diagnostics


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


# --- tree -> rule IR ------------------------------------------------------------------


_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


class _Value:
    """A value and where it was written (unwrapped when the IR is built)."""

    __slots__ = ("value", "span")

    def __init__(self, value, span):
        self.value, self.span = value, span


def _unwrap(v):
    return v.value if isinstance(v, _Value) else v


def _span(item) -> Span:
    if isinstance(item, Token):
        return Span(item.line, item.column, item.end_line, item.end_column, item.start_pos, item.end_pos)
    m = item  # lark Meta
    return Span(m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos)


def _kids(children, *types):
    """The children that are not punctuation tokens or absent optional parts."""
    return [c for c in children if c is not None and not (isinstance(c, Token) and c.type in types)]


_PUNCT = ("COMMA", "LPAR", "RPAR", "LSQB", "RSQB", "LBRACE", "RBRACE", "EQUALS", "RANGE")


@v_args(meta=True)
class _BuildRules(Transformer):
    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self.diagnostics: list[Diagnostic] = []

    # strings and values
    def _string(self, token: Token) -> str:
        # \\ \" \n \t are escapes; any other backslash is kept, so a glob can say \{ or \*.
        return _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), token.value[1:-1])

    def int_value(self, meta, children):
        return _Value(int(children[0].value), _span(children[0]))

    def float_value(self, meta, children):
        token = children[0]
        return _Value(float(token.value), _span(token))  # 1e999 gives inf, which the checks reject

    def string_value(self, meta, children):
        return _Value(self._string(children[0]), _span(children[0]))

    def true_value(self, meta, children):
        return _Value(True, _span(children[0]))

    def false_value(self, meta, children):
        return _Value(False, _span(children[0]))

    def list(self, meta, children):
        return _Value(tuple(_unwrap(v) for v in _kids(children, *_PUNCT)), _span(meta))

    # selectors
    def selectors(self, meta, children):
        return tuple(_kids(children, *_PUNCT))

    def glob_selector(self, meta, children):
        return ir.GlobSelector(self._string(children[0]), span=_span(children[0]))

    def regex_selector(self, meta, children):
        token = children[0]
        return ir.RegexSelector(token.value[3:-1], span=_span(token))

    def _type_name(self, children):
        token = _kids(children, *_PUNCT, "TYPE")[0]
        if token.type == "STRING":
            return self._string(token), True, _span(token)
        return token.value, False, _span(token)

    def type_selector(self, meta, children):
        name, quoted, span = self._type_name(children)
        return ir.TypeSelector(name, quoted, span=span)

    # predicates
    def comparison(self, meta, children):
        field, op, value = children
        return ir.Comparison(field.value, op.value, _unwrap(value), span=_span(meta))

    def in_range(self, meta, children):
        field, _, start, _, stop = children
        return ir.InRange(field.value, int(start.value), int(stop.value), span=_span(meta))

    def in_list(self, meta, children):
        field, _, values = children
        return ir.InList(field.value, _unwrap(values), span=_span(meta))

    def name_test(self, meta, children):
        token = _kids(children, *_PUNCT, "NAME_TEST")[0]
        return ir.NameTest(self._string(token), span=_span(token))

    def type_test(self, meta, children):
        name, quoted, span = self._type_name(children)
        return ir.TypeTest(name, quoted, span=span)

    def not_predicate(self, meta, children):
        return ir.Not(children[1], span=_span(meta))

    def and_test(self, meta, children):
        return ir.And(tuple(_kids(children, "AND")), span=_span(meta))

    def or_test(self, meta, children):
        return ir.Or(tuple(_kids(children, "OR")), span=_span(meta))

    def atom(self, meta, children):  # ( predicate )
        return _kids(children, *_PUNCT)[0]

    # actions
    def keyword_argument(self, meta, children):
        name, _, value = children
        return ir.Argument(name.value, _unwrap(value), span=_span(name), value_span=value.span)

    def positional_argument(self, meta, children):
        value = children[0]
        return ir.Argument(None, _unwrap(value), span=value.span, value_span=value.span)

    def call(self, meta, children):
        name = children[0]
        arguments = tuple(_kids(children[1:], *_PUNCT))
        return ir.MethodCall(name.value, arguments, span=_span(name))

    def apply_action(self, meta, children):
        return ir.Apply(children[1], span=_span(meta))

    def skip_action(self, meta, children):
        return ir.Skip(span=_span(meta))

    def train_action(self, meta, children):
        return ir.Train(span=_span(meta))

    # rules and blocks
    def rule(self, meta, children):
        _, selectors, _, where, action = children
        return ir.Rule(selectors, action, where, span=_span(meta))

    def adapter_block(self, meta, children):
        name = children[1]
        rules = tuple(c for c in children if isinstance(c, ir.Rule))
        header = Span(meta.line, meta.column, name.end_line, name.end_column, meta.start_pos, name.end_pos)
        return ir.Adapter(self._string(name), rules, span=header)

    def start(self, meta, children):
        # Top-level rules form the adapter "default", declared where its first rule stands.
        adapters: list = []
        default_rules: list = []
        for child in children:
            if isinstance(child, ir.Rule):
                if not default_rules:
                    adapters.append(None)  # placeholder for "default"
                default_rules.append(child)
            else:
                adapters.append(child)
        if default_rules:
            first = default_rules[0].span
            adapters[adapters.index(None)] = ir.Adapter(ir.DEFAULT_ADAPTER, tuple(default_rules), span=first)
        return adapters
