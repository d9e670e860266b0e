"""The lark tree of a surgery file -> the rule IR (rules.py), with every node's span.

The tree is walked with an explicit stack, not recursion (lark's Transformer recurses once a
level and looks up a method per token: the walk here is the faster half of parsing), and a
subtree nested deeper than ``MAX_DEPTH`` is reported rather than built. The text may be parsed
in pieces: ``line_shift`` and ``pos_shift`` say where the piece starts, so spans point into the
whole file.
"""

from __future__ import annotations

import re

from lark import Token, Tree

from surgeon.diagnostics import Span
from surgeon.grammar import rules as ir
from surgeon.grammar.limits import MAX_DEPTH

__all__ = ["BuildRules", "TooDeep", "span_of", "assemble"]


_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


class _Value:
    """A value and where it was written (unwrapped when the IR is built)."""

    __slots__ = ("value", "span")

    def __init__(self, value, span):
        self.value, self.span = value, span


def _unwrap(v):
    return v.value if isinstance(v, _Value) else v


def span_of(item, line_shift: int = 0, pos_shift: int = 0) -> Span:
    """The span of a token or of a tree's meta, in a piece of text that starts at line ``line_shift + 1``."""
    if isinstance(item, Token):
        return Span(item.line + line_shift, item.column, item.end_line + line_shift, item.end_column,
                    item.start_pos + pos_shift, item.end_pos + pos_shift)
    m = item  # lark Meta
    return Span(m.line + line_shift, m.column, m.end_line + line_shift, m.end_column, m.start_pos + pos_shift,
                m.end_pos + pos_shift)


def _kids(children, *types):
    """The children that are not punctuation tokens or absent optional parts."""
    return [c for c in children if c is not None and not (isinstance(c, Token) and c.type in types)]


_PUNCT = ("COMMA", "LPAR", "RPAR", "LSQB", "RSQB", "LBRACE", "RBRACE", "EQUALS", "RANGE")


class TooDeep(Exception):
    """A subtree nested deeper than MAX_DEPTH; ``span`` is where it starts."""

    def __init__(self, span: Span):
        super().__init__("too deep")
        self.span = span


class BuildRules:
    """Builds the statements of one parsed piece of text: ``BuildRules(...).build(tree)``."""

    def __init__(self, line_shift: int = 0, pos_shift: int = 0):
        self.line_shift, self.pos_shift = line_shift, pos_shift

    def span(self, item) -> Span:
        return span_of(item, self.line_shift, self.pos_shift)

    def build(self, tree: Tree) -> list:
        """The rules, adapter blocks and merges of ``tree``, in order (TooDeep past MAX_DEPTH levels)."""
        methods: dict = {}
        done: list = []  # built values, children before their parent
        todo = [(tree, 0, False)]
        while todo:
            node, depth, ready = todo.pop()
            if not isinstance(node, Tree):
                done.append(node)
            elif ready:
                k = len(node.children)
                children = done[len(done) - k:]
                del done[len(done) - k:]
                method = methods.get(node.data) or methods.setdefault(node.data, getattr(self, node.data))
                done.append(method(node.meta, children))
            elif depth > MAX_DEPTH:
                raise TooDeep(self.span(node.meta))
            else:
                todo.append((node, depth, True))
                todo.extend((child, depth + 1, False) for child in reversed(node.children))
        return done[0]

    # strings and values
    def _string(self, token: Token) -> str:
        # \\ \" \n \t are escapes; any other backslash is kept, so a glob can say \{ or \*.
        return _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), token.value[1:-1])

    def int_value(self, meta, children):
        return _Value(int(children[0].value), self.span(children[0]))

    def float_value(self, meta, children):
        token = children[0]
        return _Value(float(token.value), self.span(token))  # 1e999 gives inf, which the checks reject

    def string_value(self, meta, children):
        return _Value(self._string(children[0]), self.span(children[0]))

    def true_value(self, meta, children):
        return _Value(True, self.span(children[0]))

    def false_value(self, meta, children):
        return _Value(False, self.span(children[0]))

    def list(self, meta, children):
        return _Value(tuple(_unwrap(v) for v in _kids(children, *_PUNCT)), self.span(meta))

    # selectors
    def selectors(self, meta, children):
        return tuple(_kids(children, *_PUNCT))

    def glob_selector(self, meta, children):
        return ir.GlobSelector(self._string(children[0]), span=self.span(children[0]))

    def regex_selector(self, meta, children):
        token = children[0]
        return ir.RegexSelector(token.value[3:-1], span=self.span(token))

    def _type_name(self, children):
        token = _kids(children, *_PUNCT, "TYPE")[0]
        if token.type == "STRING":
            return self._string(token), True, self.span(token)
        return token.value, False, self.span(token)

    def type_selector(self, meta, children):
        name, quoted, span = self._type_name(children)
        return ir.TypeSelector(name, quoted, span=span)

    def role_selector(self, meta, children):
        names = [t for t in children if getattr(t, "type", None) == "ROLE_NAME"]
        return ir.RoleSelector(tuple(t.value for t in names), span=self.span(meta), name_spans=tuple(self.span(t) for t in names))

    # predicates
    def comparison(self, meta, children):
        field, op, value = children
        return ir.Comparison(field.value, op.value, _unwrap(value), span=self.span(meta))

    def in_range(self, meta, children):
        field, _, start, _, stop = children
        return ir.InRange(field.value, int(start.value), int(stop.value), span=self.span(meta))

    def in_list(self, meta, children):
        field, _, values = children
        return ir.InList(field.value, _unwrap(values), span=self.span(meta))

    def name_test(self, meta, children):
        token = _kids(children, *_PUNCT, "NAME_TEST")[0]
        return ir.NameTest(self._string(token), span=self.span(token))

    def type_test(self, meta, children):
        name, quoted, span = self._type_name(children)
        return ir.TypeTest(name, quoted, span=span)

    def not_predicate(self, meta, children):
        return ir.Not(children[1], span=self.span(meta))

    def and_test(self, meta, children):
        return ir.And(tuple(_kids(children, "AND")), span=self.span(meta))

    def or_test(self, meta, children):
        return ir.Or(tuple(_kids(children, "OR")), span=self.span(meta))

    def atom(self, meta, children):  # ( predicate )
        return _kids(children, *_PUNCT)[0]

    # actions
    def keyword_argument(self, meta, children):
        name, _, value = children
        return ir.Argument(name.value, _unwrap(value), span=self.span(name), value_span=value.span)

    def positional_argument(self, meta, children):
        value = children[0]
        return ir.Argument(None, _unwrap(value), span=value.span, value_span=value.span)

    def call(self, meta, children):
        name = children[0]
        arguments = tuple(_kids(children[1:], *_PUNCT))
        return ir.MethodCall(name.value, arguments, span=self.span(name))

    def apply_action(self, meta, children):
        return ir.Apply(children[1], span=self.span(meta))

    def skip_action(self, meta, children):
        return ir.Skip(span=self.span(meta))

    def train_action(self, meta, children):
        return ir.Train(span=self.span(meta))

    # rules and blocks
    def rule(self, meta, children):
        _, selectors, _, where, action = children
        return ir.Rule(selectors, action, where, span=self.span(meta))

    def adapter_block(self, meta, children):
        name = children[1]
        rules = tuple(c for c in children if isinstance(c, ir.Rule))
        start, end = self.span(meta), self.span(name)
        header = Span(start.line, start.column, end.end_line, end.end_column, start.start, end.end)
        return ir.Adapter(self._string(name), rules, span=header)

    def merge_statement(self, meta, children):
        name, call = children[1], children[3]
        return ir.Merge(self._string(name), call, span=self.span(meta))

    def start(self, meta, children):
        return children


def assemble(statements: list) -> tuple[list, list]:
    """(adapters, merges) of a file's statements: top-level rules form the adapter "default", declared
    where its first rule stands."""
    adapters: list = []
    default_rules: list = []
    merges = [c for c in statements if isinstance(c, ir.Merge)]
    for child in statements:
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
