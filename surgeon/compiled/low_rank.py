"""Adapters as low-rank factors: the sites whose update is exactly ``s B A``, which merging reads and swapping writes.

A site module says whether its update is that plain product
(``low_rank_factors() -> (A (r, in), B (out, r), s)`` or None, with
``low_rank_refusal()`` saying why not, and ``load_low_rank_factors(A, B)``
writing new ones; see surgeon/methods/adapter.py). Three things need only that:

- :func:`low_rank_sites`: each adapter's low-rank sites, which an unfolded
  program lists for a later hot swap (surgeon/checkpoints/program.py).
- :func:`swap_adapter` (``Compiled.swap_adapter``): another PEFT adapter's
  factors written into an adapter's tensors, zero-padded to the compiled rank
  and rescaled to its scale (surgeon/checkpoints/hot_swap.py), so no graph is
  captured again and a ``torch.compile``d model is not recompiled.
- :func:`merge_adapters` (``Compiled.merge``): a new adapter from weighted
  adapters, as PEFT's ``add_weighted_adapter``. For every site that a source
  adapts, in plan order, the sources' factors there are merged by
  :func:`surgeon.compiled.merge_math.merge_low_rank_site` (with the weights of
  the sources present at that site, as PEFT does). The result is an adapter of
  the low-rank method (``surgeon.methods.low_rank_method()``) with the merged
  rank of each site and alpha = r (scale 1, the scales being folded into the
  factors): it is planned from generated rules, so it saves, loads, folds,
  switches and routes like any other. Sources' ``train`` modules are not merged.
"""

from __future__ import annotations

import torch

from surgeon.diagnostics import SurgeryError
from surgeon.grammar import rules as ir
from surgeon.grammar.check import checked_rule_set
from surgeon.grammar.names import checked_name
from surgeon.methods import low_rank_call

from surgeon.checkpoints.hot_swap import swapped_factors
from surgeon.compiled.gates import gate_values
from surgeon.compiled.merge_math import check_merge_args, merge_low_rank_site

__all__ = ["low_rank_sites", "swap_adapter", "merge_adapters"]


def low_rank_sites(compiled) -> dict:
    """adapter -> path -> (rank, scale, in, out) of each site of ``compiled`` whose update is exactly s B A."""
    found: dict = {}
    for adapter, path, module in compiled.sites():
        factors = module.low_rank_factors()
        if factors is not None:
            a, _, scale = factors
            found.setdefault(adapter, {})[path] = (int(a.shape[0]), scale, module.in_features, module.out_features)
    return found


def swap_adapter(compiled, name: str, directory) -> None:
    """Write the PEFT adapter in ``directory`` into adapter ``name``'s factors, in place (no new graph).

    Every site of ``name`` must be low-rank; everything is checked before the first tensor is written."""
    sites = low_rank_sites(compiled).get(name, {})
    others = [s.path for s in compiled.plan.sites if s.adapter == name and s.path not in sites]
    if not sites or others:
        raise SurgeryError(f"adapter {name!r} is not made of plain LoRA on linear layers only, which a swap needs"
                           + (f" ({others[0]})" if others else ""), hint="load_adapter() replaces any adapter (a new graph)")
    with torch.no_grad():
        for path, (a, b) in swapped_factors(sites, directory).items():
            compiled.adapter_module(name, path).load_low_rank_factors(a, b)


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
    by_path: dict = {}  # path -> [(adapter, (A, B, s))] in source order
    for site in compiled.plan.sites:
        if site.adapter not in sources:
            continue
        module = compiled.adapter_module(site.adapter, site.path)
        factors = module.low_rank_factors()
        if factors is None:
            raise SurgeryError(f"merge {name!r}: adapter {site.adapter!r} has {module.low_rank_refusal()}; "
                               "merging takes plain LoRA adapters on linear layers",
                               hint="PEFT's add_weighted_adapter has the same limit")
        by_path.setdefault(site.path, []).append((site.adapter, factors))
    if not by_path:
        raise SurgeryError(f"merge {name!r}: the adapters {', '.join(sources)} adapt no module")
    merged = {}
    for path, found in by_path.items():
        factors = []
        for _, (a, b, scale) in found:
            wide = torch.promote_types(a.dtype, torch.float32)  # float64 adapters merge in float64
            factors.append((a.detach().to(wide), b.detach().to(wide), scale))
        try:
            weights = [sources[adapter] for adapter, _ in found]
            merged[path] = merge_low_rank_site(factors, weights, combination, single_as_linear=len(sources) == 1, **options)
        except ValueError as exc:
            raise SurgeryError(f"merge {name!r} at {path}: {exc}") from None
    by_rank: dict = {}
    for path, (a, _, _) in merged.items():
        by_rank.setdefault(a.shape[0], []).append(path)
    rules = tuple(ir.Rule(tuple(ir.GlobSelector(_literal_glob(p)) for p in paths), ir.Apply(low_rank_call(rank)))
                  for rank, paths in by_rank.items())
    compiled.add_adapter(name, checked_rule_set(ir.RuleSet((ir.Adapter(name, rules),), path=f"<merge {name}>")))
    compiled.set_gates({**gate_values(compiled.adapter_names, compiled.adapter_gates), name: 0.0})
    with torch.no_grad():
        for path, (a, b, _) in merged.items():
            compiled.adapter_module(name, path).load_low_rank_factors(a, b)
    return name


def _literal_glob(path: str) -> str:
    """A glob matching exactly ``path`` (glob characters made literal)."""
    return "".join("\\" + c if c in "*?[]{},\\" else c for c in path)
