"""surgeon.grammar: surgery text -> a checked :class:`RuleSet` (never imports torch).

The pipeline's first stage, and the floor above the errors (``surgeon/diagnostics.py``,
re-exported here). ``surgery.lark`` is the grammar, ``parse`` turns text into the
rule IR of ``rules``, and ``check`` validates it against the method signatures
of ``signature`` (a table the method registry fills: the language never imports
the methods).
"""

from surgeon.diagnostics import Diagnostic, ModelError, PlanError, RulesError, Span, SurgeryError
from surgeon.grammar.parse import load_rules, parse
from surgeon.grammar.rules import (
    DEFAULT_ADAPTER, Adapter, And, Apply, Argument, Comparison, GlobSelector, InList, InRange, MethodCall, NameTest, Not,
    Or, RegexSelector, RoleSelector, Rule, RuleSet, Skip, Train, TypeSelector, TypeTest,
)

__all__ = [
    "parse", "load_rules",
    "Diagnostic", "Span", "SurgeryError", "RulesError", "ModelError", "PlanError",
    "RuleSet", "Adapter", "Rule", "DEFAULT_ADAPTER",
    "GlobSelector", "RegexSelector", "TypeSelector", "RoleSelector",
    "Comparison", "InRange", "InList", "NameTest", "TypeTest", "Not", "And", "Or",
    "Argument", "MethodCall", "Apply", "Skip", "Train",
]
