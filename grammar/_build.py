"""The lark tree of a surgery file -> the rule IR (rules.py), with every node's span."""

from __future__ import annotations

import re

from lark import Token, Transformer, v_args

from . import rules as ir
from .diagnostics import Diagnostic, Span

__all__ = ["BuildRules", "span_of"]


_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


class _Value:
    """A value and where it was written (unwrapped when the IR is built)."""

    __slots__ = ("value", "span")

    def __init__(self, value, span):
        self.value, self.span = value, span


def _unwrap(v):
    return v.value if isinstance(v, _Value) else v


def span_of(item) -> Span:
    if isinstance(item, Token):
        return Span(item.line, item.column, item.end_line, item.end_column, item.start_pos, item.end_pos)
    m = item  # lark Meta
    return Span(m.line, m.column, m.end_line, m.end_column, m.start_pos, m.end_pos)


def _kids(children, *types):
    """The children that are not punctuation tokens or absent optional parts."""
    return [c for c in children if c is not None and not (isinstance(c, Token) and c.type in types)]


_PUNCT = ("COMMA", "LPAR", "RPAR", "LSQB", "RSQB", "LBRACE", "RBRACE", "EQUALS", "RANGE")


@v_args(meta=True)
class BuildRules(Transformer):
    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self.diagnostics: list[Diagnostic] = []

    # strings and values
    def _string(self, token: Token) -> str:
        # \\ \" \n \t are escapes; any other backslash is kept, so a glob can say \{ or \*.
        return _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), token.value[1:-1])

    def int_value(self, meta, children):
        return _Value(int(children[0].value), span_of(children[0]))

    def float_value(self, meta, children):
        token = children[0]
        return _Value(float(token.value), span_of(token))  # 1e999 gives inf, which the checks reject

    def string_value(self, meta, children):
        return _Value(self._string(children[0]), span_of(children[0]))

    def true_value(self, meta, children):
        return _Value(True, span_of(children[0]))

    def false_value(self, meta, children):
        return _Value(False, span_of(children[0]))

    def list(self, meta, children):
        return _Value(tuple(_unwrap(v) for v in _kids(children, *_PUNCT)), span_of(meta))

    # selectors
    def selectors(self, meta, children):
        return tuple(_kids(children, *_PUNCT))

    def glob_selector(self, meta, children):
        return ir.GlobSelector(self._string(children[0]), span=span_of(children[0]))

    def regex_selector(self, meta, children):
        token = children[0]
        return ir.RegexSelector(token.value[3:-1], span=span_of(token))

    def _type_name(self, children):
        token = _kids(children, *_PUNCT, "TYPE")[0]
        if token.type == "STRING":
            return self._string(token), True, span_of(token)
        return token.value, False, span_of(token)

    def type_selector(self, meta, children):
        name, quoted, span = self._type_name(children)
        return ir.TypeSelector(name, quoted, span=span)

    def role_selector(self, meta, children):
        names = [t for t in children if getattr(t, "type", None) == "ROLE_NAME"]
        return ir.RoleSelector(tuple(t.value for t in names), span=span_of(meta), name_spans=tuple(span_of(t) for t in names))

    # predicates
    def comparison(self, meta, children):
        field, op, value = children
        return ir.Comparison(field.value, op.value, _unwrap(value), span=span_of(meta))

    def in_range(self, meta, children):
        field, _, start, _, stop = children
        return ir.InRange(field.value, int(start.value), int(stop.value), span=span_of(meta))

    def in_list(self, meta, children):
        field, _, values = children
        return ir.InList(field.value, _unwrap(values), span=span_of(meta))

    def name_test(self, meta, children):
        token = _kids(children, *_PUNCT, "NAME_TEST")[0]
        return ir.NameTest(self._string(token), span=span_of(token))

    def type_test(self, meta, children):
        name, quoted, span = self._type_name(children)
        return ir.TypeTest(name, quoted, span=span)

    def not_predicate(self, meta, children):
        return ir.Not(children[1], span=span_of(meta))

    def and_test(self, meta, children):
        return ir.And(tuple(_kids(children, "AND")), span=span_of(meta))

    def or_test(self, meta, children):
        return ir.Or(tuple(_kids(children, "OR")), span=span_of(meta))

    def atom(self, meta, children):  # ( predicate )
        return _kids(children, *_PUNCT)[0]

    # actions
    def keyword_argument(self, meta, children):
        name, _, value = children
        return ir.Argument(name.value, _unwrap(value), span=span_of(name), value_span=value.span)

    def positional_argument(self, meta, children):
        value = children[0]
        return ir.Argument(None, _unwrap(value), span=value.span, value_span=value.span)

    def call(self, meta, children):
        name = children[0]
        arguments = tuple(_kids(children[1:], *_PUNCT))
        return ir.MethodCall(name.value, arguments, span=span_of(name))

    def apply_action(self, meta, children):
        return ir.Apply(children[1], span=span_of(meta))

    def skip_action(self, meta, children):
        return ir.Skip(span=span_of(meta))

    def train_action(self, meta, children):
        return ir.Train(span=span_of(meta))

    # rules and blocks
    def rule(self, meta, children):
        _, selectors, _, where, action = children
        return ir.Rule(selectors, action, where, span=span_of(meta))

    def adapter_block(self, meta, children):
        name = children[1]
        rules = tuple(c for c in children if isinstance(c, ir.Rule))
        header = Span(meta.line, meta.column, name.end_line, name.end_column, meta.start_pos, name.end_pos)
        return ir.Adapter(self._string(name), rules, span=header)

    def merge_statement(self, meta, children):
        name, call = children[1], children[3]
        return ir.Merge(self._string(name), call, span=span_of(meta))

    def start(self, meta, children):
        # Top-level rules form the adapter "default", declared where its first rule stands.
        adapters: list = []
        default_rules: list = []
        merges = [c for c in children if isinstance(c, ir.Merge)]
        for child in children:
            if isinstance(child, ir.Merge):
                continue
            if isinstance(child, ir.Rule):
                if not default_rules:
                    adapters.append(None)  # placeholder for "default"
                default_rules.append(child)
            else:
                adapters.append(child)
        if default_rules:
            first = default_rules[0].span
            adapters[adapters.index(None)] = ir.Adapter(ir.DEFAULT_ADAPTER, tuple(default_rules), span=first)
        return adapters, merges
