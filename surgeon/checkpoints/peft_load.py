"""Loading an adapter folder into a compiled model: everything checked before anything changes.

A load reads the folder's configs and tensors (peft_folder.py) and its rules
(peft_rules.py), then stages the adapter (staging.py): first on the meta
device, which says which tensors of which shapes the adapter holds without
allocating them, so the file is checked against that (no missing or extra
keys, every shape equal) before any memory is spent on an adapter the file
cannot fill (``r=10**9`` costs nothing); then for real, filled from the file;
and only then is it swapped into the model, in one step. A load that fails,
for whatever reason, leaves the model exactly as it was: the same adapters,
the same parameters, the same outputs (a replaced adapter keeps its weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from surgeon.grammar import SurgeryError
from surgeon.grammar.names import checked_name
from surgeon.methods.adapter import adapter_class

from surgeon.checkpoints.peft_folder import CONFIG, WEIGHTS, adapter_folders, configs, read_tensors
from surgeon.methods.peft_format import PREFIX, AdapterError
from surgeon.checkpoints.peft_rules import adapter_rule_set, part_rules
from surgeon.checkpoints.staging import commit_adapter, rolled_back, stage_adapter

__all__ = ["load_adapter", "expected_state"]


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


def _staged_state(staged) -> dict:
    from surgeon.compiled.adapter_state import site_key

    return expected_state(staged.plan, staged.module, lambda path: staged.trained[site_key(path)], staged.name)


def load_adapter(compiled, directory, name: str | None = None) -> str:
    """Load a PEFT-format adapter (surgeon's or PEFT's) as adapter ``name``; returns the name.

    A folder holding several adapters (subfolders) loads them all under their own names, as one
    step: if one fails, the model gets back what it had before the first.
    """
    if name is not None:
        checked_name(name, where="load_adapter")
    folders = adapter_folders(directory)
    if len(folders) > 1 and name is None:
        with rolled_back(compiled):
            for adapter, folder in folders:
                _load_one(compiled, folder, adapter)
        return ", ".join(a for a, _ in folders)
    return _load_one(compiled, folders[0][1], name or folders[0][0])


def _load_one(compiled, folder: Path, name: str) -> str:
    tensors, found = {}, []
    for part, config in configs(folder):
        part_tensors = read_tensors(part)
        tensors.update(part_tensors)
        found.append(part_rules(part, config, keys=part_tensors))  # surgeon's own folder: its exact rules
    rules = adapter_rule_set(name, folder, found)
    source = folder / WEIGHTS
    try:
        shapes = stage_adapter(compiled, name, rules, device="meta")
    except (NotImplementedError, RuntimeError, SurgeryError):
        # a site that cannot be built without the weight's values (PiSSA starts from its SVD): checked once built;
        # a real planning error is raised again by the build below
        shapes = None
    if shapes is not None:
        _check(compiled, shapes, tensors, source)
    try:
        staged = stage_adapter(compiled, name, rules)
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: nothing was changed
        raise AdapterError(f"{folder / CONFIG}: cannot build adapter '{name}': {str(exc)[:200]}") from None
    expected = _check(compiled, staged, tensors, source)
    with torch.no_grad():
        for key, param in expected.items():  # the new modules first: none is the model's yet
            if not _shared(staged, key):
                param.copy_(tensors[key].to(param.dtype))
        commit_adapter(compiled, staged)
        for key, param in expected.items():  # copies other adapters train too, once the adapter is in
            if _shared(staged, key):
                param.copy_(tensors[key].to(param.dtype))
    return name


def _shared(staged, key: str) -> bool:
    """Is ``key`` a parameter of a trainable copy the model already has (shared with other adapters)?"""
    return any(key.startswith(f"{PREFIX}{k.replace('__', '.')}.") for k in staged.shared)


def _check(compiled, staged, tensors: dict, source: Path) -> dict:
    """The staged adapter's expected tensors (key -> tensor), once ``tensors`` fit them exactly; else an AdapterError.

    ``tensors`` loses the copies of base embeddings that PEFT also saves (checked to be the base model's own).
    """
    expected = _staged_state(staged)
    adapted = [site.path for site in staged.plan.sites if site.adapter == staged.name]
    for path in adapted:
        # PEFT also saves the whole base embedding when one is adapted (save_embedding_layers):
        # accept it when it is the base model's own, refuse a resized or changed one.
        key = f"{PREFIX}{path}.base_layer.weight"
        if key not in tensors:
            continue
        base = compiled.base_model.get_submodule(path).weight.detach()
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

