"""surgeon.grammar: surgery text -> a checked :class:`RuleSet` (never imports torch).

The pipeline's first stage. ``surgery.lark`` is the grammar, ``parse`` turns
text into the rule IR of ``rules``, ``check`` validates it against the method
registry, and ``diagnostics`` says what is wrong and where.
"""

from surgeon.diagnostics import Diagnostic, ModelError, PlanError, RulesError, Span, SurgeryError
from surgeon.grammar.parse import load_rules, parse
from surgeon.grammar.rules import (
    DEFAULT_ADAPTER,
    Adapter,
    And,
    Apply,
    Argument,
    Comparison,
    GlobSelector,
    InList,
    InRange,
    MethodCall,
    NameTest,
    Not,
    Or,
    RegexSelector,
    Rule,
    RuleSet,
    Skip,
    Train,
    TypeSelector,
    RoleSelector,
    TypeTest,
)

__all__ = [
    "parse",
    "load_rules",
    "Diagnostic",
    "Span",
    "SurgeryError",
    "RulesError",
    "ModelError",
    "PlanError",
    "RuleSet",
    "Adapter",
    "Rule",
    "GlobSelector",
    "RegexSelector",
    "TypeSelector",
    "RoleSelector",
    "Comparison",
    "InRange",
    "InList",
    "NameTest",
    "TypeTest",
    "Not",
    "And",
    "Or",
    "Argument",
    "MethodCall",
    "Apply",
    "Skip",
    "Train",
    "DEFAULT_ADAPTER",
]
