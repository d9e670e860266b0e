"""The rule IR: what a ``.surgery`` file says, as frozen, typed dataclasses.

A :class:`RuleSet` is a sequence of :class:`Adapter` s, each a sequence of
:class:`Rule` s in file order. Every node carries the :class:`Span` it came
from; spans take no part in equality, so two rule sets are equal when they say
the same thing. ``str(rule_set)`` (or :meth:`RuleSet.to_text`) prints valid
surgery text that parses back to an equal rule set.

Precedence (within one adapter): when several rules match a module, the last
one in the file wins, whatever its action (``apply``, ``skip`` or ``train``).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from surgeon.grammar._scan import source_lines
from surgeon.diagnostics import Span
from surgeon.grammar.glob import compile_glob
from surgeon.grammar.regex import regex_fullmatch

__all__ = [
    "Value",
    "format_value",
    "GlobSelector",
    "RegexSelector",
    "TypeSelector",
    "RoleSelector",
    "Selector",
    "Comparison",
    "InRange",
    "InList",
    "NameTest",
    "TypeTest",
    "Not",
    "And",
    "Or",
    "Predicate",
    "Argument",
    "MethodCall",
    "Apply",
    "Skip",
    "Train",
    "Action",
    "Rule",
    "Adapter",
    "Merge",
    "RuleSet",
    "DEFAULT_ADAPTER",
]

DEFAULT_ADAPTER = "default"

# A value written in a rules file: int, float, str, bool, or a list (tuple) of values.
Value = Union[int, float, str, bool, tuple]


def _no_span():
    # Spans say where a node was written; they take no part in equality.
    return field(default=None, compare=False, repr=False)


def _quote(text: str, prefix: str = "") -> str:
    if prefix:  # regex literals are verbatim; only a bare quote needs escaping
        return prefix + '"' + re.sub(r'(?<!\\)((?:\\\\)*)"', r'\1\\"', text) + '"'
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + escaped + '"'


def format_value(value: Any) -> str:
    """Surgery text for a value; parsing it gives back an equal value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written in a rules file")
        text = repr(value)
        if "e" in text or "E" in text:
            mantissa, exponent = text.lower().split("e")
            if "." not in mantissa:
                mantissa += ".0"
            return f"{mantissa}e{int(exponent)}"
        return text
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"not a rules value: {value!r}")


# --- selectors: which module paths or types a rule looks at -------------------


@dataclass(frozen=True)
class GlobSelector:
    """A glob over the whole dotted path: ``*`` (dots included), ``?``, ``[0-9]``, ``{a,b}``."""

    pattern: str
    span: Span | None = _no_span()

    def matches(self, path: str) -> bool:
        return compile_glob(self.pattern).fullmatch(path)

    def __str__(self) -> str:
        return _quote(self.pattern)


@dataclass(frozen=True)
class RegexSelector:
    """A Python regular expression that must match the whole dotted path (in bounded time: grammar/regex.py)."""

    pattern: str
    span: Span | None = _no_span()

    def matches(self, path: str) -> bool:
        return regex_fullmatch(self.pattern, path)

    def __str__(self) -> str:
        return _quote(self.pattern, prefix="re")


@dataclass(frozen=True)
class TypeSelector:
    """A module class name (``Linear``, ``Conv1D``, ...)."""

    name: str
    quoted: bool = False  # type("MyBlock"): a class of the user's own, not checked by name
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"type({_quote(self.name) if self.quoted else self.name})"


@dataclass(frozen=True)
class RoleSelector:
    """``role(attn.q, mlp.*)``: sites whose dataflow role (surgeon/capture/roles.py) is one of these; ``*`` is any run of characters."""

    roles: tuple
    span: Span | None = _no_span()
    name_spans: tuple = field(default=(), compare=False, repr=False)  # where each role is written

    def matches_role(self, role: str | None) -> bool:
        # "unknown" is no role: role(*) selects what the analysis understood, never what it could not read
        return role not in (None, "unknown") and any(fnmatch.fnmatchcase(role, pattern) for pattern in self.roles)

    def __str__(self) -> str:
        return f"role({', '.join(self.roles)})"


Selector = Union[GlobSelector, RegexSelector, TypeSelector, RoleSelector]


# --- predicates: the `where` clause ---------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """``field OP value`` with OP one of ``== != < <= > >=``."""

    field: str
    op: str
    value: Value
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"{self.field} {self.op} {format_value(self.value)}"


@dataclass(frozen=True)
class InRange:
    """``field in start..stop``: half-open, as Python's ``range(start, stop)``."""

    field: str
    start: int
    stop: int
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"{self.field} in {self.start}..{self.stop}"


@dataclass(frozen=True)
class InList:
    """``field in [v, ...]``."""

    field: str
    values: tuple
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"{self.field} in {format_value(self.values)}"


@dataclass(frozen=True)
class NameTest:
    """``name("glob")``: the module path matches a glob."""

    pattern: str
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"name({_quote(self.pattern)})"


@dataclass(frozen=True)
class TypeTest:
    """``type(Name)``: the module's class is ``Name``."""

    name: str
    quoted: bool = False
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"type({_quote(self.name) if self.quoted else self.name})"


@dataclass(frozen=True)
class Not:
    operand: "Predicate"
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"not {_wrap(self.operand, Not)}"


@dataclass(frozen=True)
class And:
    operands: tuple
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return " and ".join(_wrap(p, And) for p in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return " or ".join(_wrap(p, Or) for p in self.operands)


Predicate = Union[Comparison, InRange, InList, NameTest, TypeTest, Not, And, Or]

# Binding strength: `not` binds tighter than `and`, which binds tighter than `or`.
_STRENGTH = {Or: 1, And: 2, Not: 3}


def _wrap(operand: Predicate, parent: type) -> str:
    # Parenthesise an operand that binds no tighter than its parent (And(And(..)) too,
    # so that the printed text parses back to the same tree).
    if _STRENGTH.get(type(operand), 4) <= _STRENGTH[parent] and type(operand) is not Not:
        return f"({operand})"
    return str(operand)


# --- actions --------------------------------------------------------------------


@dataclass(frozen=True)
class Argument:
    """``name=value`` in a method call (``name`` is None for a positional value)."""

    name: str | None
    value: Value
    span: Span | None = _no_span()
    value_span: Span | None = _no_span()

    def __str__(self) -> str:
        value = format_value(self.value)
        return value if self.name is None else f"{self.name}={value}"


@dataclass(frozen=True)
class MethodCall:
    """``method(name=value, ...)`` as written; ``config`` is the checked config object."""

    name: str
    arguments: tuple = ()
    span: Span | None = _no_span()
    config: Any = field(default=None, compare=False, repr=False)

    @property
    def kwargs(self) -> dict:
        return {a.name: a.value for a in self.arguments if a.name is not None}

    def __str__(self) -> str:
        return f"{self.name}({', '.join(str(a) for a in self.arguments)})"


@dataclass(frozen=True)
class Apply:
    """Give the matched modules this adapter method."""

    method: MethodCall
    span: Span | None = _no_span()

    def __str__(self) -> str:
        return f"apply {self.method}"


@dataclass(frozen=True)
class Skip:
    """The matched modules get nothing from this adapter."""

    span: Span | None = _no_span()

    def __str__(self) -> str:
        return "skip"


@dataclass(frozen=True)
class Train:
    """All parameters of the matched modules train (PEFT's ``modules_to_save``)."""

    span: Span | None = _no_span()

    def __str__(self) -> str:
        return "train"


Action = Union[Apply, Skip, Train]


# --- rules, adapters, rule sets ----------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``match SELECTOR, ... [where PREDICATE] ACTION``."""

    selectors: tuple
    action: Action
    where: Predicate | None = None
    span: Span | None = _no_span()

    def __str__(self) -> str:
        text = "match " + ", ".join(str(s) for s in self.selectors)
        if self.where is not None:
            text += f" where {self.where}"
        return f"{text} {self.action}"


@dataclass(frozen=True)
class Adapter:
    """A named adapter: the rules of one ``adapter "NAME" { ... }`` block (or the top level)."""

    name: str
    rules: tuple
    span: Span | None = _no_span()

    def to_text(self) -> str:
        if self.name == DEFAULT_ADAPTER:
            return "".join(f"{rule}\n" for rule in self.rules)
        body = "".join(f"  {rule}\n" for rule in self.rules)
        return f"adapter {_quote(self.name)} {{\n{body}}}\n"


@dataclass(frozen=True)
class Merge:
    """``merge "NAME" = TYPE(adapter=weight, ..., option=value)``: a new adapter of weighted adapters."""

    name: str
    call: MethodCall  # the combination type; keyword arguments: adapter weights and the type's options
    span: Span | None = _no_span()

    def weights(self, options: tuple) -> dict:
        """Adapter name -> weight (the arguments that are not among ``options``)."""
        return {a.name: a.value for a in self.call.arguments if a.name not in options}

    def __str__(self) -> str:
        return f"merge {_quote(self.name)} = {self.call}"


@dataclass(frozen=True)
class RuleSet:
    """Every adapter of a rules file, in the order they were declared, then its merges."""

    adapters: tuple = ()
    path: str | None = field(default=None, compare=False)
    warnings: tuple = field(default=(), compare=False, repr=False)
    source: str | None = field(default=None, compare=False, repr=False)  # the text it was parsed from
    merges: tuple = ()

    def source_line(self, line: int) -> str | None:
        """Line ``line`` (1-based) of the text this rule set was parsed from."""
        lines = () if self.source is None else source_lines(self.source)  # split once per text, not per line asked
        return lines[line - 1] if 0 < line <= len(lines) else None

    @property
    def rules(self) -> tuple:
        """All rules, adapter by adapter."""
        return tuple(rule for adapter in self.adapters for rule in adapter.rules)

    @property
    def adapter_names(self) -> tuple:
        return tuple(adapter.name for adapter in self.adapters)

    def adapter(self, name: str) -> Adapter:
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        raise KeyError(name)

    def to_text(self) -> str:
        text = "\n".join(adapter.to_text() for adapter in self.adapters)
        return text + "".join(f"\n{merge}\n" for merge in self.merges)

    def __str__(self) -> str:
        return self.to_text()

    def __len__(self) -> int:
        return sum(len(adapter.rules) for adapter in self.adapters)
