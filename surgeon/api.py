"""The Python API: one verb per stage.

    rules = surgeon.load_rules("rules.surgery")         # text -> checked rules
    captured = surgeon.capture_model("demo:llama")     # model -> graph + sites
    plan = surgeon.plan("demo:llama", rules)           # rules x graph -> what will change

A model is an ``nn.Module`` or a string: a local Hugging Face folder, a Hub id,
``package.module:factory`` or ``demo:NAME``. Planning never needs weights: for
folders, Hub ids and demos, the model is built from its config with fake
tensors (``weights=False``, the default here).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from surgeon.grammar import RuleSet, load_rules, parse

from .capture import Captured, capture
from .models import open_model
from .plan import Plan, build_plan

__all__ = ["capture_model", "plan"]


def capture_model(model: Any, *, example_inputs: Any = None, weights: bool = False) -> Captured:
    """Open and capture ``model``; ``weights=True`` loads real weights (folders and Hub ids)."""
    return capture(open_model(model, weights=weights, example_inputs=example_inputs))


def plan(
    model: Any,
    rules: RuleSet | str | os.PathLike,
    *,
    example_inputs: Any = None,
    checkpoint_dtype: str = "float32",
) -> Plan:
    """What ``rules`` will do to ``model``. Raises SurgeryError (RulesError, ModelError, PlanError)."""
    rule_set = _rules(rules)
    captured = model if isinstance(model, Captured) else capture_model(model, example_inputs=example_inputs)
    return build_plan(rule_set, captured, checkpoint_dtype=checkpoint_dtype)


def _rules(rules) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str) and not Path(rules).exists() and ("\n" in rules or rules.lstrip().startswith(("match", "adapter", "#"))):
        return parse(rules)
    return load_rules(rules)
