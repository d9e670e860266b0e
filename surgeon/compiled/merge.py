"""Making a new adapter from weighted adapters (``Compiled.merge``; the math is in merging.py).

For every site that at least one source adapter adapts, in plan order, the
sources' LoRA factors there are merged by :func:`surgeon.compiled.merge_math.merge_lora_site`
(with the weights of the sources present at that site, as PEFT does). The
result is an ordinary LoRA adapter, with the merged rank of each site and
alpha = r (scale 1, the scales being folded into the factors): it is planned
from generated rules, so it saves, loads, folds, switches and routes like any
other. Sources must be LoRA adapters on linear or GPT-2 Conv1D sites; their
``train`` modules are not merged.
"""

from __future__ import annotations

import torch

from surgeon.grammar import rules as ir
from surgeon.grammar.check import checked_rule_set
from surgeon.diagnostics import SurgeryError
from surgeon.grammar.names import checked_name

from surgeon.compiled.merge_math import check_merge_args, merge_lora_site

__all__ = ["merge_adapters"]


def merge_adapters(compiled, name: str, sources: dict, combination: str = "linear", *, replace: bool = False, **options) -> str:
    """Add adapter ``name`` = ``combination`` of ``sources`` (adapter name -> weight); returns ``name``.

    The new adapter starts inactive (its sources are what it is made of: running both would count them
    twice); ``set_active(name)`` uses it.
    """
    checked_name(name, where="merge")
    try:
        check_merge_args(combination, **options)
    except (ValueError, TypeError) as exc:
        raise SurgeryError(f"merge {name!r}: {exc}") from None
    if not sources:
        raise SurgeryError(f"merge {name!r}: name at least one adapter to merge")
    unknown = [a for a in sources if a not in compiled.adapter_names]
    if unknown:
        raise SurgeryError(f"merge {name!r}: no adapter named {', '.join(map(repr, unknown))}",
                           hint=f"adapters: {', '.join(compiled.adapter_names)}")
    if name in sources:
        raise SurgeryError(f"merge {name!r}: the merged adapter cannot replace one of its sources")
    if name in compiled.adapter_names and not replace:
        raise SurgeryError(f"merge {name!r}: an adapter of that name exists", hint="merge(..., replace=True) replaces it")
    by_path: dict = {}
    for site in compiled.plan.sites:
        if site.adapter not in sources:
            continue
        module = compiled.adapter_module(site.adapter, site.path)
        if site.method != "lora" or site.kind not in ("linear", "hf_conv1d") or module.residual or module.lora_B_bias is not None:
            raise SurgeryError(
                f"merge {name!r}: adapter {site.adapter!r} has {site.method} on {site.path} ({site.kind}"
                f"{', with a bias on B' if site.method == 'lora' and module.lora_B_bias is not None else ''}); "
                "merging takes plain LoRA adapters on linear layers",
                hint="PEFT's add_weighted_adapter has the same limit",
            )
        by_path.setdefault(site.path, []).append(site.adapter)
    if not by_path:
        raise SurgeryError(f"merge {name!r}: the adapters {', '.join(sources)} adapt no module")
    merged = {}
    for path, adapters in by_path.items():
        factors = []
        for adapter in adapters:
            module = compiled.adapter_module(adapter, path)
            wide = torch.promote_types(module.lora_A.dtype, torch.float32)  # float64 adapters merge in float64
            factors.append((module.lora_A.detach().to(wide), module.lora_B.detach().to(wide), module.scale))
        try:
            weights = [sources[a] for a in adapters]
            merged[path] = merge_lora_site(factors, weights, combination, single_as_linear=len(sources) == 1, **options)
        except ValueError as exc:
            raise SurgeryError(f"merge {name!r} at {path}: {exc}") from None
    by_rank: dict = {}
    for path, (a, _, _) in merged.items():
        by_rank.setdefault(a.shape[0], []).append(path)
    rules = tuple(
        ir.Rule(tuple(ir.GlobSelector(_literal_glob(p)) for p in paths),
                ir.Apply(ir.MethodCall("lora", (ir.Argument("r", rank), ir.Argument("alpha", rank)))))
        for rank, paths in by_rank.items()
    )
    compiled.add_adapter(name, checked_rule_set(ir.RuleSet((ir.Adapter(name, rules),), path=f"<merge {name}>")))
    compiled.set_gates({**dict(zip(compiled.adapter_names, compiled.adapter_gates.tolist())), name: 0.0})
    with torch.no_grad():
        for path, (a, b, _) in merged.items():
            module = compiled.adapter_module(name, path)
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    return name


def _literal_glob(path: str) -> str:
    """A glob matching exactly ``path`` (glob characters made literal)."""
    return "".join("\\" + c if c in "*?[]{},\\" else c for c in path)
