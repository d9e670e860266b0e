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
from dataclasses import replace
from pathlib import Path
from typing import Any

from surgeon.capture.captured import Captured, capture
from surgeon.capture.models import full_precision_source, open_model
from surgeon.capture.quantized_bases import prepare_kbit_training
from surgeon.checkpoints.peft_rules import peft_rule_set
from surgeon.compiled.model import Compiled
from surgeon.diagnostics import PlanError, SurgeryError
from surgeon.grammar.parse import load_rules, parse
from surgeon.grammar.rules import RuleSet
from surgeon.grammar.vocabulary import MERGE_OPTIONS
from surgeon.planning.plan import Plan, build_plan

__all__ = ["capture_model", "plan", "compile"]


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
    if isinstance(rules, str) and ("\n" in rules or rules.lstrip().startswith(("match", "adapter", "#"))):
        if "\n" in rules or not Path(rules).exists():  # rules text (a file name has no newline)
            return parse(rules)
    return load_rules(rules)


def compile(
    model: Any,
    rules: RuleSet | str | os.PathLike | None = None,
    *,
    adapter: str | os.PathLike | None = None,
    example_inputs: Any = None,
    passes: dict | None = None,
    adapter_dtype: Any = None,
    lint: bool = True,
    kernels: str = "auto",
    full_precision: Any = None,
    kbit_training: bool = False,
):
    """Adapt ``model`` as ``rules`` say, or as the PEFT adapter folder ``adapter`` says (and load its weights).

    ``passes`` adds graph passes of your own at named points (surgeon.passes.POINTS),
    e.g. ``{"after_insert": [my_pass]}``. ``kernels``: "auto" (the fused Triton
    kernels on a GPU with Triton; on the CPU plain LoRA sites call the fused op's torch path;
    aten ops elsewhere), "triton" or "torch" (plain aten ops everywhere).
    ``full_precision``: for a bitsandbytes-quantized model, its unquantized weights
    (a model, a state dict, or a safetensors folder), which ``lora(init="loftq")``
    starts from (the quantized demos know theirs). ``kbit_training``: first do to the
    model what PEFT's ``prepare_model_for_kbit_training`` does to a graph (its unquantized
    float16/bfloat16 parameters become float32; see surgeon.capture.quantized_bases.prepare_kbit_training).
    Returns a :class:`surgeon.compiled.model.Compiled`.
    """
    if rules is None and adapter is None:
        raise SurgeryError("compile needs rules, or an adapter folder to derive them from", hint="surgeon.compile(model, rules)")
    if rules is not None:
        rule_set = _rules(rules)
    else:
        rule_set = peft_rule_set(adapter)  # built and checked as objects: no text from the folder is parsed
    opened = model if hasattr(model, "example_kwargs") else open_model(model, weights=True, example_inputs=example_inputs)
    if full_precision is not None:
        opened.full_precision = full_precision_source(full_precision)
    if kbit_training:
        prepare_kbit_training(opened.module)
    captured = capture(opened)
    compiled = Compiled(
        captured, rule_set, build_plan(rule_set, captured), passes=passes, lint=lint, adapter_dtype=adapter_dtype, kernels=kernels
    )
    if adapter is not None:
        compiled.load_adapter(adapter)
    _apply_merges(compiled, rule_set)
    return compiled


def _apply_merges(compiled, rule_set) -> None:
    """Make the adapters of the rules' ``merge`` statements, in order (their sources are built or loaded by now)."""
    for merge in rule_set.merges:
        options = {k: v for k, v in merge.call.kwargs.items() if k in MERGE_OPTIONS}
        try:
            compiled.merge(merge.name, merge.weights(tuple(MERGE_OPTIONS)), merge.call.name, **options)
        except SurgeryError as exc:  # located at the merge statement
            line = rule_set.source_line(merge.span.line) if merge.span else None
            located = [replace(d, span=merge.span, file=rule_set.path or "<rules>", source_line=line) for d in exc.diagnostics]
            raise PlanError(located) from None
