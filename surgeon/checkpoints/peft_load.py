"""Reading an adapter folder for a load: its rules and tensors, and the check that they fit, before anything changes.

A load (surgeon/compiled/checkpointing.py) reads the folder's configs and tensors
(peft_folder.py) and its rules (peft_rules.py) with :func:`read_adapter`, then
stages the adapter aside: first on the meta device, which says which tensors of
which shapes the adapter holds without allocating them, so the file is checked
against that with :func:`fitted_state` (no missing or extra keys, every shape
equal) before any memory is spent on an adapter the file cannot fill
(``r=10**9`` costs nothing); then for real, filled from the file; and only then
is it swapped into the model, in one step. A load that fails, for whatever
reason, leaves the model exactly as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgeon.grammar import rules as ir
from surgeon.methods.adapter import adapter_class
from surgeon.methods.peft_format import PREFIX, AdapterError

from surgeon.checkpoints.peft_folder import WEIGHTS, configs, read_tensors
from surgeon.checkpoints.peft_rules import adapter_rule_set, part_rules

__all__ = ["expected_state", "read_adapter", "fitted_state"]


def expected_state(plan, module_of, trained_of, adapter: str, method: str | None = None, trained: bool = True,
                   saving: bool = False) -> dict:
    """PEFT key -> the tensor it saves from or loads into, for one adapter of ``plan`` (or its sites of one method).

    ``module_of(path)``: the adapter's SiteAdapter on a site; ``trained_of(path)``: its trainable copy of a module.
    """
    expected, modules = {}, {}
    for site in plan.sites:
        if site.adapter != adapter or method not in (None, site.method):
            continue
        module = module_of(site.path)
        modules.setdefault(site.method, []).append(module)
        for suffix, tensor in (module.peft_saved_state() if saving else module.peft_state()).items():
            expected[f"{PREFIX}{site.path}.{suffix}"] = tensor
    for name, group in modules.items():
        expected.update(adapter_class(name).peft_shared_state(group))
    for t in plan.trained:
        if t.adapter == adapter and trained:
            for pname, param in trained_of(t.path).named_parameters():
                expected[f"{PREFIX}{t.path}.{pname}"] = param
    return expected


def read_adapter(folder: Path, name: str) -> tuple[ir.RuleSet, dict, Path]:
    """(checked rules of adapter ``name``, PEFT key -> tensor, the weights file) of one adapter folder.

    A folder of surgeon's gives its exact rules (its record); any other, its PEFT config as PEFT reads it.
    """
    tensors, found = {}, []
    for part, config in configs(folder):
        part_tensors = read_tensors(part)
        tensors.update(part_tensors)
        found.append(part_rules(part, config, keys=part_tensors))
    return adapter_rule_set(name, folder, found), tensors, folder / WEIGHTS


def fitted_state(expected: dict, tensors: dict, adapted, base_weight, source: Path) -> dict:
    """``expected`` (PEFT key -> the tensor it loads into), once ``tensors`` fit it exactly; else an AdapterError.

    ``adapted``: the paths of the adapter's sites; ``base_weight(path)``: the base model's weight there.
    ``tensors`` loses the copies of base embeddings that PEFT also saves (checked to be the base model's own).
    """
    for path in adapted:
        # PEFT also saves the whole base embedding when one is adapted (save_embedding_layers):
        # accept it when it is the base model's own, refuse a resized or changed one.
        key = f"{PREFIX}{path}.base_layer.weight"
        if key not in tensors:
            continue
        base = base_weight(path).detach()
        if tuple(tensors[key].shape) != tuple(base.shape) or not torch.equal(tensors[key].to(base.dtype), base):
            raise AdapterError(
                f"{source} carries a changed copy of {path}.weight (a resized vocabulary?), which surgeon does not load",
                hint="compile the model the adapter was trained on, with its embedding as saved",
            )
        del tensors[key]
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        # every odd tensor at a module the rules adapt: a PEFT setting the reading missed, not another base model
        prefixes = tuple(f"{PREFIX}{path}." for path in adapted)
        here = all(k.startswith(prefixes) for k in unknown + missing)
        what = f"{'tensors its adapters here do not have' if here else 'weights for modules this model does not adapt'}: "
        what = what + ", ".join(k[:120] for k in unknown[:3]) if unknown else ""
        what += ("; " if what else "") + (f"no weights for {', '.join(missing[:3])}" if missing else "")
        hint = "the adapter uses a PEFT setting surgeon does not read?" if here else "was it saved from another base model?"
        raise AdapterError(f"{source} does not fit this model: {what}", hint=hint)
    for key, param in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, this model needs {tuple(param.shape)}",
                hint="the adapter was made for another base model, or another rank",
            )
    return expected

