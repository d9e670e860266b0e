"""Checking a saved program's graph (``models/model.json``) for what torch would run from it as code.

torch 2.13's deserializer and ``ExportedProgram.module()`` turn four kinds of
string from this file into Python:

- Each symbolic shape's ``expr_str`` goes to ``sympy.sympify``
  (``serde/serialize.py:_parse_sym_expr``), which ``eval``s it: any Python.
  Accepted: sympy's ``srepr``/``str`` forms, i.e. calls of a fixed set of sympy
  and torch shape functions on numbers, symbols (``s0``) and identifier
  strings, with keyword flags (``integer=True``); powers only to a literal
  exponent of at most 64, at most 3 per expression (``Integer(9)**10**9``
  would not finish).
- ``guards_code`` is pasted into a function ``exec``'d by ``.module()``
  (``export/_unlift.py:_convert_guards_code_to_fn``). Accepted: comparisons
  and arithmetic of numbers and ``L['input'].size()[i]`` (also ``stride``,
  ``storage_offset``, ``dim``, ``numel``), with no quotes, newlines or comments
  that could leave the generated ``torch._assert(...)`` line.
- Each node's ``target`` (and an ``as_operator`` argument) is resolved by
  ``getattr`` from ``torch``, ``operator`` or ``math`` (``deserialize_operator``),
  and any callable found is called when the program runs: ``torch.os.system``
  resolves. Accepted: a registered operator (``torch.ops.<ns>.<op>.<overload>``,
  a higher-order operator) or one of torch's own symbolic-int functions.
- A pytree spec's context may name an enum or a ``defaultdict`` factory, which
  torch imports by module name (``utils/_pytree.py``). Refused.

A string constant of the graph (``as_string``) may not hold quotes, backslashes
or newlines either: ``.module()`` writes constant inputs into the same
generated guard code (``_unlift.py:_get_input_guards_for_graph``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import operator
import re

import torch
from torch._export.serde.serialize import _SYM_OPS

from surgeon.diagnostics import SurgeryError

__all__ = ["check_graph", "check_sym_expr", "check_guard", "check_target"]

_HINT = "load only .pt2 files written by torch.export.save (surgeon's export); this one was changed or made by hand"
_SYMPY_NAMES = frozenset({
    "Symbol", "Dummy", "Integer", "Float", "Rational", "Half", "One", "Zero", "NegativeOne", "Add", "Mul", "Pow",
    "Min", "Max", "Abs", "floor", "ceiling", "sqrt", "Mod", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality",
    "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "And", "Or", "Not",
    "true", "false", "BooleanTrue", "BooleanFalse", "oo", "zoo", "nan", "Infinity", "NegativeInfinity",
    "NaN", "ComplexInfinity", "Piecewise", "ExprCondPair", "Tuple", "S",
    # torch's own, the locals its deserializer gives sympify (serde/serialize.py, ``sympy_functions``)
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_log2",
})
_SYMBOL = re.compile(r"[a-z]{1,4}\d{1,9}")  # torch's shape symbols: s0, u3, zuf0, ps12 (no builtin has this form)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,200}")
_DECIMAL = re.compile(r"[-+]?\d{1,40}(\.\d{0,40})?([eE][-+]?\d{1,3})?")  # Float('1.5') in srepr
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
        ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or, ast.BitAnd, ast.BitOr)
_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load, *_OPS)
_SHAPE_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_MAX_EXPR = 20_000  # characters; torch writes shape expressions of tens
_MAX_INT = 1 << 64


def _refuse(where: str, what: str):
    raise SurgeryError(f"{where}: {what}", hint=_HINT) from None


def _parsed(text, where: str, kind: str) -> ast.Expression:
    if not isinstance(text, str) or len(text) > _MAX_EXPR or "\\" in text or "#" in text or "\n" in text:
        _refuse(where, f"the {kind} {str(text)[:80]!r} is not one torch writes")
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        _refuse(where, f"the {kind} {text[:80]!r} is not an expression")


def _number(node) -> bool:
    return type(node.value) in (int, float, bool) and not (type(node.value) is int and abs(node.value) > _MAX_INT)


def _small_exponent(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" and len(node.args) == 1:
        node = node.args[0]
    return isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= 64


def check_sym_expr(text, where: str) -> None:
    """Refuse a shape expression that is not plain sympy (it is ``eval``'d by ``sympy.sympify``)."""
    tree = _parsed(text, where, "shape expression")
    powers = 0
    for node in ast.walk(tree):
        ok = isinstance(node, (*_ARITHMETIC, ast.Call, ast.keyword))
        if isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or bool(_SYMBOL.fullmatch(node.id))
        elif isinstance(node, ast.Constant):
            text_ok = isinstance(node.value, str) and (_WORD.fullmatch(node.value) or _DECIMAL.fullmatch(node.value))
            ok = _number(node) or bool(text_ok)
        elif isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES
            if ok and node.func.id == "Pow":
                powers += 1
                ok = len(node.args) == 2 and _small_exponent(node.args[1])
        elif isinstance(node, ast.keyword):
            ok = node.arg is not None and bool(_WORD.fullmatch(node.arg)) and isinstance(node.value, ast.Constant) \
                and type(node.value.value) in (bool, int) and abs(node.value.value) <= 1024  # integer=True, precision=53
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            powers += 1
            ok = _small_exponent(node.right)
        if not ok or powers > 3:
            _refuse(where, f"the shape expression {text[:120]!r} is not plain sympy "
                           f"({type(node).__name__} {getattr(node, 'id', '')}; torch would eval it)".replace(" )", ")"))


def _input_access(node) -> bool:
    """``L['name']`` (one or more string subscripts), the guard's way of naming an input."""
    while isinstance(node, ast.Subscript):
        key = node.slice
        if not (isinstance(key, ast.Constant) and (type(key.value) is int
                                                   or isinstance(key.value, str) and _WORD.fullmatch(key.value))):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


def check_guard(text, where: str) -> None:
    """Refuse a guard that is more than arithmetic on input shapes (``.module()`` ``exec``s it)."""
    tree = _parsed(text, where, "guard")
    if '"' in text:  # the guard is also pasted into a "..." message string
        _refuse(where, f"the guard {text[:120]!r} is not one torch writes")
    allowed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            method = node.func
            ok = (isinstance(method, ast.Attribute) and method.attr in _SHAPE_METHODS and _input_access(method.value)
                  and not node.keywords and len(node.args) <= 1
                  and all(isinstance(a, ast.Constant) and type(a.value) is int for a in node.args))
            if ok:
                allowed.update(ast.walk(method))
                allowed.update(node.args)
        elif isinstance(node, ast.Subscript) and node not in allowed:
            ok = _input_access(node) or (isinstance(node.slice, ast.Constant) and type(node.slice.value) is int)
            if ok and _input_access(node):
                allowed.update(ast.walk(node))
            elif ok:
                allowed.add(node.slice)
        elif isinstance(node, ast.Constant):
            ok = node in allowed or _number(node)
        else:
            ok = node in allowed or isinstance(node, _ARITHMETIC)
        if not ok:
            _refuse(where, f"the guard {text[:120]!r} is more than arithmetic on input shapes "
                           f"({type(node).__name__}; .module() would exec it)")


def _resolved(text: str):
    """What ``deserialize_operator`` makes of ``text`` (the same getattr walk; None if it stops early)."""
    parts = text.split(".")
    roots = {"torch": torch, "_operator": operator, "math": math}
    if parts[0] not in roots or not all(_WORD.fullmatch(p) for p in parts[1:]):
        return None
    if parts[:2] == ["torch", "ops"]:
        # torch.ops's own attributes (load_library, import_module) and dunders are not operator namespaces.
        if len(parts) < 4 or parts[2].startswith("_") or hasattr(type(torch.ops), parts[2]):
            return None
    elif any(p.startswith("__") for p in parts):
        return None
    target = roots[parts[0]]
    for name in parts[1:]:
        try:
            target = getattr(target, name)
        except (AttributeError, RuntimeError):
            return None
    return target


def check_target(text, where: str) -> None:
    """Refuse a node target that is not an operator (torch would call whatever ``torch.<...>`` it names)."""
    target = _resolved(text) if isinstance(text, str) else None
    ok = isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
    try:
        ok = ok or target in _SYM_OPS
    except TypeError:  # an unhashable attribute: not one of them
        pass
    if not ok:
        custom = isinstance(text, str) and text.startswith("torch.ops.")
        raise SurgeryError(f"{where}: the graph calls {str(text)[:120]!r}, which is not a registered operator here",
                           hint="a custom op must be registered before loading (import its library); or the file "
                                "was made by hand" if custom else _HINT) from None


def _check_spec(text, where: str) -> None:
    """A pytree spec (JSON text): no enum or defaultdict-factory context, which torch imports by name."""
    try:
        spec = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        _refuse(where, "a pytree spec is not JSON")
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            kind, context = node.get("type"), node.get("context")
            if kind == "collections.defaultdict" or (isinstance(context, str) and "__enum__" in context):
                _refuse(where, f"a pytree spec names a {kind or 'enum'} context, which torch would import by name")
            if isinstance(kind, str) and kind.startswith("transformers."):
                _import_output_class(kind)
            stack.extend(node.values())


def _import_output_class(kind: str) -> None:
    """Register a transformers output class with pytree (transformers does so when its module is first imported,
    which a fresh process has not done): only modules inside the installed transformers package."""
    module = kind.rpartition(".")[0]
    if not re.fullmatch(r"transformers(\.[a-z0-9_]+)+", module):
        return
    try:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    except (ImportError, ValueError):
        pass  # torch then says the type is not registered


def check_graph(model, where: str) -> None:
    """Check a parsed ``models/model.json``: every expression, guard, target, spec and string constant."""
    if not isinstance(model, dict) or not isinstance(model.get("graph_module"), dict):
        _refuse(where, "not a serialized ExportedProgram (no graph_module)")
    guards = model.get("guards_code") or []
    if not isinstance(guards, list):
        _refuse(where, "guards_code is not a list")
    for guard in guards:
        check_guard(guard, where)
    stack = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key == "expr_str":
                check_sym_expr(value, where)
            elif key == "target" and "inputs" in node or key == "as_operator":
                check_target(value, where)
            elif key in ("in_spec", "out_spec") and isinstance(value, str):
                _check_spec(value, where)
            elif key in ("as_string", "as_strings"):
                for text in value if isinstance(value, list) else [value]:
                    if not isinstance(text, str) or re.search(r"['\"\\\n\r]", text):
                        _refuse(where, f"the string constant {str(text)[:80]!r} holds quotes or escapes")
            stack.append(value)
