"""Parameters: the SiteAdapter of each planned site and the trainable copy of each ``train`` module.

A site's module is its method's SiteAdapter (surgeon/methods), built for the
weight the site reads (a MultiheadAttention site: the method's adapter for a
site of several weights), in float32 (float64 for a float64 model) or the
``adapter_dtype`` asked for. A site whose adapter starts from the model's
full-precision weights (``starts_from_full_precision``: LoftQ, on a
bitsandbytes-quantized base) is started from them here, where those weights
are known. ``device="meta"`` builds shapes only: nothing is allocated or
started, so a file can be checked against them first (staging.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from surgeon.capture.sites import site_weight
from surgeon.diagnostics import PlanError
from surgeon.methods.adapter import SiteAdapter, build_site_adapter
from surgeon.passes.fold_quantized import conv1d_paths

__all__ = ["site_key", "site_module", "trainable_copy"]


def site_key(path: str) -> str:
    """A module path as a ModuleDict key (dots are not allowed there)."""
    return path.replace(".", "__")


def site_module(captured, base_model: nn.Module, site, plan, rules, adapter_dtype=None, device=None, conv1d=None,
                loftq_report: dict | None = None) -> SiteAdapter:
    """A new SiteAdapter for plan site ``site`` of ``plan`` (made from ``rules``) on ``base_model``.

    ``captured``: the planning capture (its sites; the opened model's full-precision weights, for LoftQ).
    ``conv1d``: a dict shared by one build, where the GPT-2 Conv1D paths of a quantized model are found once.
    ``loftq_report``: site path -> ||W - Q||, ||W - Q - s B A|| of each LoftQ-started site, filled in.
    """
    captured_site = captured.sites[site.path]
    weight = site_weight(base_model, captured_site)  # the parameter the site reads (MHA: in_proj_weight)
    dtype = adapter_dtype or (weight.dtype if weight.dtype == torch.float64 else torch.float32)
    device, conv1d = torch.device(device or weight.device), {} if conv1d is None else conv1d
    # peers: the adapter's sites of the same method (VeRA shares its projections among them)
    peers = tuple(s for s in plan.sites if s.adapter == site.adapter and s.method == site.method)
    module = build_site_adapter(site, captured_site, rules, dtype=dtype, device=device,
                                weight=weight if device == weight.device else weight.to(device), peers=peers)
    module.site_path, module.tied_with = site.path, tuple(site.tied_with)
    if module.starts_from_full_precision and device.type != "meta":
        if "paths" not in conv1d:
            conv1d["paths"] = conv1d_paths(base_model)
        report = _start_from_full_precision(captured, base_model, site, module, transposed=site.path in conv1d["paths"])
        if loftq_report is not None:
            loftq_report[site.path] = report
    return module


def _start_from_full_precision(captured, base_model: nn.Module, site, module: SiteAdapter, transposed: bool) -> dict:
    """Start ``module`` from the full-precision weight of its quantized site (LoftQ); ``transposed``: that weight is
    stored (in, out) (GPT-2's Conv1D, which bitsandbytes quantized as (out, in))."""
    source = captured.opened.full_precision
    if source is None:
        raise PlanError(f"{site.method}(init=\"loftq\") on {site.path} needs the model's unquantized weights",
                        hint="surgeon.compile(model, rules, full_precision=<the unquantized model, state dict or folder>)")
    weight = source(f"{site.path}.weight")
    weight = weight.T if transposed else weight
    return module.start_from_full_precision(base_model.get_submodule(site.path), weight)


def trainable_copy(base_model: nn.Module, path: str) -> nn.Module:
    """A trainable deep copy of ``base_model``'s module at ``path`` (``train`` rules train it, not the user's module)."""
    module = copy.deepcopy(base_model.get_submodule(path))
    for p in module.parameters():
        p.requires_grad_(True)
    return module
