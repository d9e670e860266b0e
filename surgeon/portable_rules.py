"""Portable rules: path globs that select whole roles of a model rewritten as ``role(...)`` selectors.

``surgeon rules-from-peft DIR --roles MODEL`` uses this to turn a PEFT config's
``target_modules`` (names of one architecture) into portable rules: a rule whose
selectors pick, on MODEL, exactly every site of some roles (``*.q_proj`` and
``*.v_proj`` pick all of attn.q and attn.v) gets ``role(attn.q, attn.v)`` instead.
A rule that picks part of a role (some layers, one of two stacks) or a site whose
role is unknown keeps its globs: a role selector would select something else.
"""

from __future__ import annotations

from dataclasses import replace

from surgeon.api import capture_model
from surgeon.capture.roles import UNKNOWN
from surgeon.grammar import rules as ir
from surgeon.grammar.parse import parse
from surgeon.planning.select import matches

__all__ = ["with_role_selectors", "rules_text_with_roles"]


def rules_text_with_roles(text: str, model, rule_set: ir.RuleSet | None = None) -> str:
    """Rules text (comments kept) with role selectors where they select the same sites of ``model``.

    ``rule_set``: the checked rules ``text`` prints, when the caller has them (then ``text`` gives only its comments).
    """
    rule_set, changed = with_role_selectors(parse(text) if rule_set is None else rule_set, capture_model(model))
    comments = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    total = sum(len(a.rules) for a in rule_set.adapters)
    return f"{comments}# {changed} of {total} rules by role, as read from {model}\n{rule_set.to_text()}"


def with_role_selectors(rule_set: ir.RuleSet, captured) -> tuple:
    """(the rule set with role selectors where they select the same sites, how many rules changed)."""
    by_role: dict = {}
    for path in captured.sites:
        by_role.setdefault(captured.modules[path].role, set()).add(path)
    changed = 0
    adapters = []
    for adapter in rule_set.adapters:
        rules = []
        for rule in adapter.rules:
            roles = _roles_of(rule, captured, by_role)
            if roles is not None:
                rule = replace(rule, selectors=(ir.RoleSelector(roles),))
                changed += 1
            rules.append(rule)
        adapters.append(replace(adapter, rules=tuple(rules)))
    return replace(rule_set, adapters=tuple(adapters)), changed


def _roles_of(rule: ir.Rule, captured, by_role: dict):
    """The roles whose sites are exactly those ``rule``'s selectors pick (its where clause aside), or None."""
    if any(isinstance(s, ir.RoleSelector) for s in rule.selectors):
        return None
    bare = replace(rule, where=None)
    picked = {path for path in captured.sites if matches(bare, captured.modules[path])}
    roles = {captured.modules[path].role for path in picked}
    if not picked or None in roles or UNKNOWN in roles:
        return None
    if set().union(*(by_role[r] for r in roles)) != picked:
        return None
    return tuple(sorted(roles))
