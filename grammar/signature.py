"""Method signatures as plain data: what arguments an adapter method takes.

An adapter method's config is a frozen dataclass whose fields are declared with
:func:`param`; :func:`signature_of` reads it into a :class:`MethodSignature`
(parameter names, types, defaults, ranges, choices). The checker validates every
``apply method(...)`` against these signatures, without importing torch::

    @dataclass(frozen=True)
    class LoraConfig:
        r: int = param(gt=0, doc="rank of the update")
        dropout: float = param(0.0, ge=0, lt=1, doc="dropout on the adapter input")

Supported field types: ``int``, ``float`` (an integer is accepted), ``bool``,
``str``, ``list[int]``, ``list[float]``, ``list[str]``, each optionally
``X | None`` (None means "not given": the method derives a default).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from surgeon.grammar.regex import regex_fullmatch
from surgeon.grammar.rules import format_value

__all__ = ["param", "Param", "MethodSignature", "signature_of", "ArgumentProblem", "register_signature", "known_signatures"]

_REQUIRED = dataclasses.MISSING
_KINDS = ("int", "float", "bool", "str", "list[int]", "list[float]", "list[str]")
_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list[int]": "a list of integers",
    "list[float]": "a list of numbers",
    "list[str]": "a list of strings",
}


def param(
    default: Any = _REQUIRED,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
    pattern: tuple | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field for a method config, with the constraints the checker enforces.

    ``pattern`` is ``(regex, how it reads)``: a string matching the regex is
    accepted besides ``choices`` (``("pissa_niter_[1-9][0-9]*", "pissa_niter_<K>")``).
    """
    rule = {"gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "pattern": pattern, "doc": doc}
    if isinstance(default, list):  # lists are stored as tuples: configs are frozen
        default = tuple(default)
    return dataclasses.field(default=default, metadata={"surgeon": rule})


@dataclass(frozen=True)
class Param:
    """One parameter of a method: name, type (one of ``_KINDS``), default and constraints."""

    name: str
    kind: str
    required: bool
    default: Any = None
    optional: bool = False  # None is a valid value (it means: derive a default)
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    pattern: tuple | None = None  # (regex, how it reads) accepted besides the choices
    doc: str = ""

    def describe(self) -> str:
        """``r: an integer, r > 0 (required); rank of the update``."""
        text = f"{self.name}: {self.expected()}"
        text += " (required)" if self.required else f" (default {self._default_text()})"
        return text + (f"; {self.doc}" if self.doc else "")

    def _default_text(self) -> str:
        return "derived" if self.default is None else format_value(self.default)

    def expected(self) -> str:
        if self.choices:
            listed = ", ".join(format_value(c) for c in self.choices)
            return "one of " + listed + (f", or {format_value(self.pattern[1])}" if self.pattern else "")
        bounds = self.bounds()
        return _WORDS[self.kind] + (f", {bounds}" if bounds else "")

    def bounds(self) -> str:
        """The allowed range as a chained comparison: ``0 <= dropout < 1``."""
        low = [(op, v) for op, v in (("<", self.gt), ("<=", self.ge)) if v is not None]
        high = [(op, v) for op, v in (("<", self.lt), ("<=", self.le)) if v is not None]
        if not low and not high:
            return ""
        text = self.name
        if low:
            op, v = low[-1]
            text = f"{format_value(v)} {op} {text}" if high else f"{text} {'>' if op == '<' else '>='} {format_value(v)}"
        if high:
            op, v = high[-1]
            text = f"{text} {op} {format_value(v)}"
        return text

    def check(self, value: Any) -> tuple[Any, "ArgumentProblem | None"]:
        """(the value converted to the field's type, or a problem with it)."""
        if value is None and self.optional:
            return None, None
        if not _finite(value):
            return value, ArgumentProblem("out-of-range", "is too large to be a number")
        converted = _convert(self.kind, value)
        if converted is _WRONG:
            return value, ArgumentProblem("bad-type", f"must be {_WORDS[self.kind]}, got {format_value(value)}")
        if self.choices is not None and converted not in self.choices and not self._fits_pattern(converted):
            return value, ArgumentProblem("bad-choice", f"must be {self.expected()}; got {format_value(value)}")
        items = converted if isinstance(converted, tuple) else (converted,)
        if self.kind in ("int", "float", "list[int]", "list[float]"):
            for item in items:
                if not self._in_range(item):
                    return value, ArgumentProblem(
                        "out-of-range", f"is out of range: {format_value(item)} (expected {self.bounds()})"
                    )
        return converted, None

    def _fits_pattern(self, value: Any) -> bool:
        return self.pattern is not None and isinstance(value, str) and regex_fullmatch(self.pattern[0], value)

    def _in_range(self, x: float) -> bool:
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )


@dataclass(frozen=True)
class ArgumentProblem:
    code: str
    message: str


_WRONG = object()


def _finite(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _convert(kind: str, value: Any) -> Any:
    if kind == "bool":
        return value if isinstance(value, bool) else _WRONG
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _WRONG
    if kind == "str":
        return value if isinstance(value, str) else _WRONG
    if kind.startswith("list["):
        if not isinstance(value, tuple):
            return _WRONG
        items = tuple(_convert(kind[5:-1], v) for v in value)
        return _WRONG if any(v is _WRONG for v in items) else items
    raise AssertionError(kind)


@dataclass(frozen=True)
class MethodSignature:
    """What the language knows of a method: its name, parameters and site kinds."""

    name: str
    params: tuple
    sites: tuple = ()
    doc: str = ""
    config_class: type | None = None

    @property
    def param_names(self) -> tuple:
        return tuple(p.name for p in self.params)

    def get(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def build(self, values: Mapping[str, Any]) -> Any:
        """The config object for already-checked, converted argument values."""
        if self.config_class is None:
            return dict(values)
        return self.config_class(**values)


def signature_of(name: str, config_class: type, sites: tuple = (), doc: str | None = None) -> MethodSignature:
    """Read a config dataclass whose fields were declared with :func:`param`."""
    hints = typing.get_type_hints(config_class)
    params = []
    for f in dataclasses.fields(config_class):
        rule = f.metadata.get("surgeon")
        if rule is None:
            raise TypeError(f"{config_class.__name__}.{f.name} must be declared with param()")
        kind, optional = _kind_of(hints[f.name])
        required = f.default is _REQUIRED
        params.append(
            Param(
                name=f.name,
                kind=kind,
                required=required,
                default=None if required else f.default,
                optional=optional,
                **rule,
            )
        )
    text = doc if doc is not None else (config_class.__doc__ or "").strip().splitlines()[0:1]
    if isinstance(text, list):
        text = text[0] if text else ""
    return MethodSignature(name, tuple(params), tuple(sites), text, config_class)


def _kind_of(annotation: Any) -> tuple[str, bool]:
    optional = False
    args = typing.get_args(annotation)
    if type(None) in args:  # X | None
        optional = True
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported parameter type {annotation!r}")
        annotation = rest[0]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        kind = f"list[{item.__name__}]"
    else:
        kind = getattr(annotation, "__name__", str(annotation))
    if kind not in _KINDS:
        raise TypeError(f"unsupported parameter type {annotation!r}")
    return kind, optional


# The methods the language knows: the method registry (surgeon/methods/, a floor above) hands each signature
# here as it registers it, so the checker reads plain data and never imports the methods. ``import surgeon``
# loads the built-in methods.
_KNOWN: dict[str, MethodSignature] = {}


def register_signature(signature: MethodSignature) -> None:
    """Make ``signature`` a method the checker knows (called by ``surgeon.methods.register_method``)."""
    if signature.name in _KNOWN:
        raise ValueError(f"method {signature.name!r} is already registered")
    _KNOWN[signature.name] = signature


def known_signatures() -> dict[str, MethodSignature]:
    """A snapshot: method name -> signature, of every registered method."""
    return dict(_KNOWN)
