"""Adding or replacing an adapter as one step: planned and built aside, then swapped in.

:func:`stage_adapter` plans the new rules and builds the new adapter's site
modules and trainable copies without touching the model; :func:`commit_adapter`
swaps them in (rules, plan, modules, copies, gates) in one go. Between the two
a caller (a load, see checkpointing.py) checks what it will put into them, so a load
that fails leaves the model exactly as it was: no half-built adapter, no
replaced adapter's weights lost. Staged on the meta device, the modules say
only which tensors, of which shapes, the adapter will hold, and nothing is
allocated: a file can be checked against them before any memory is spent.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from surgeon.grammar import rules as ir
from surgeon.grammar.names import checked_name
from surgeon.planning.plan import build_plan

from surgeon.compiled.building import site_key, site_module, trainable_copy
from surgeon.compiled.gates import gate_values, gates_for

__all__ = ["Staged", "stage_adapter", "commit_adapter", "build_missing", "rolled_back"]


@dataclass
class Staged:
    """Adapter ``name`` planned and built, not yet part of the model."""

    name: str
    rules: ir.RuleSet  # the model's rules with the adapter added or replaced
    plan: object
    modules: nn.ModuleDict  # site key -> the adapter's new SiteAdapter
    trained: dict = field(default_factory=dict)  # site key -> the trainable copy the adapter will train
    shared: set = field(default_factory=set)  # keys of ``trained`` that are the model's own copies (other adapters train them too)

    def module(self, path: str):
        return self.modules[site_key(path)]


def stage_adapter(compiled, name: str, rules: ir.RuleSet, device=None) -> Staged:
    """Plan adapter ``name`` with the rules of ``rules`` (all its adapters' rules, merged) and build its modules aside.

    ``device="meta"``: shapes only (no memory, no initialisation); the trainable copies are then the base
    model's own modules, to be read, never written. Raises what planning or building raises; the model is unchanged.
    """
    checked_name(name)
    new = ir.Adapter(name, tuple(rule for adapter in rules.adapters for rule in adapter.rules))
    names = compiled.rules.adapter_names  # a replaced adapter keeps its place (adapter_ids index it)
    adapters = tuple(new if a.name == name else a for a in compiled.rules.adapters) + (() if name in names else (new,))
    new_rules = ir.RuleSet(adapters, path=rules.path, source=rules.source, merges=compiled.rules.merges)
    plan = build_plan(new_rules, compiled.captured)
    staged = Staged(name, new_rules, plan, nn.ModuleDict())
    meta = device is not None and str(device) == "meta"
    with warnings.catch_warnings():
        if meta:
            warnings.simplefilter("ignore")  # the real build says it again
        conv1d: dict = {}
        for site in plan.sites:
            if site.adapter == name:
                staged.modules[site_key(site.path)] = site_module(
                    compiled.captured, compiled.base_model, site, plan, new_rules, compiled.adapter_dtype, device=device,
                    conv1d=conv1d, loftq_report=compiled.loftq_report)
    for t in plan.trained:
        if t.adapter != name:
            continue
        key = site_key(t.path)
        others = {u.adapter for u in plan.trained if u.path == t.path} - {name}
        if others and key in compiled.trained:  # one copy per module, shared with the adapters that train it too
            staged.trained[key] = compiled.trained[key]
            staged.shared.add(key)
        elif meta:
            staged.trained[key] = compiled.base_model.get_submodule(t.path)
        else:  # the replaced adapter's train modules start again from the base
            staged.trained[key] = trainable_copy(compiled.base_model, t.path)
    return staged


def build_missing(compiled, adapter_dtype=None) -> None:
    """Build the site modules and trainable copies of ``compiled.plan`` not made yet, and give every adapter a gate
    (kept where it had one; a new adapter starts active)."""
    conv1d: dict = {}  # GPT-2 Conv1D paths of a quantized model, found once (LoftQ only)
    plan = compiled.plan
    for site in plan.sites:
        if site.adapter in compiled.adapters and site_key(site.path) in compiled.adapters[site.adapter]:
            continue
        group = compiled.adapters[site.adapter] if site.adapter in compiled.adapters else nn.ModuleDict()
        group[site_key(site.path)] = site_module(compiled.captured, compiled.base_model, site, plan, compiled.rules,
                                                 adapter_dtype, conv1d=conv1d, loftq_report=compiled.loftq_report)
        compiled.adapters[site.adapter] = group
    for t in plan.trained:
        if site_key(t.path) not in compiled.trained:  # one trainable copy per module (several adapters may train it)
            compiled.trained[site_key(t.path)] = trainable_copy(compiled.base_model, t.path)


def commit_adapter(compiled, staged: Staged) -> None:
    """Make ``staged`` part of the model: its rules, plan, modules and copies replace the old ones in one step.

    A replaced adapter starts active again; every other adapter keeps its gate."""
    name = staged.name
    kept = gate_values(compiled.adapter_names, compiled.adapter_gates)
    kept.pop(name, None)
    if name in compiled.adapters:
        del compiled.adapters[name]
    compiled.rules, compiled.plan = staged.rules, staged.plan
    compiled.adapter_gates = gates_for(compiled.adapter_names, kept, device=compiled.adapter_gates.device)
    if len(staged.modules):
        compiled.adapters[name] = staged.modules
    still = {t.path for t in staged.plan.trained}
    for key in [k for k in compiled.trained if k.replace("__", ".") not in still]:
        del compiled.trained[key]  # a train copy no adapter trains any more
    for key, module in staged.trained.items():
        compiled.trained[key] = module
    build_missing(compiled, compiled.adapter_dtype)  # nothing left to build but a caller's hand-made gaps
    compiled.invalidate()


@contextlib.contextmanager
def rolled_back(compiled):
    """Several commits as one: if the body raises, the model gets back exactly what it had (rules, plan,
    modules, trainable copies and their values, gates) and the error propagates."""
    kept = (compiled.rules, compiled.plan, dict(compiled.adapters), dict(compiled.trained), compiled.adapter_gates.clone())
    values = {k: [p.detach().clone() for p in m.parameters()] for k, m in compiled.trained.items()}
    try:
        yield
    except BaseException:
        compiled.rules, compiled.plan = kept[0], kept[1]
        for box, old in ((compiled.adapters, kept[2]), (compiled.trained, kept[3])):
            for key in list(box):
                del box[key]
            for key, module in old.items():
                box[key] = module
        with torch.no_grad():  # a copy shared with a loaded adapter was filled in place
            for key, saved in values.items():
                for param, value in zip(compiled.trained[key].parameters(), saved):
                    param.copy_(value)
        compiled.adapter_gates = kept[4]
        compiled.invalidate()
        raise
