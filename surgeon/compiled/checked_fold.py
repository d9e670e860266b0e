"""The one fold: a compiled model's adapters merged into its base weights, checked against the unfolded graph.

``Compiled.fold()`` runs the fold pass (passes/fold.py) on the evaluation
graph through a :class:`~surgeon.compiled.merged_model.Folded` and checks the
merged graph's outputs against the unfolded one's (:func:`checked_fold`). Every
merged artifact comes from it: the Folded model, ``merged_state_dict()`` and
the merged checkpoint (its ``state_dict()``), the merged program, and
``fold(inplace=True)``, which writes its tensors into the base model's own
parameters (:func:`write_in_place`); while folded in place the compiled model
runs the base graph (the adapters are in the weights), as a merged PEFT layer
does, until ``unfold()`` restores every tensor bit for bit
(:meth:`InPlace.restore`). Sites on bitsandbytes weights merge from their
dequantized weights, then stay in full precision or are quantized again
(passes/fold_quantized.py); the check is then a report of the difference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from surgeon.passes import verify_fold
from surgeon.passes.fold import TOLERANCES, FoldError, output_difference
from surgeon.passes.fold_quantized import QUANTIZED_MERGES

from surgeon.compiled.merged_model import Folded

__all__ = ["InPlace", "checked_fold", "check_quantized_merge", "refuse_tied_in_place", "write_in_place"]


class InPlace:
    """An in-place fold: the weights it folded with, and each written parameter's original data (for unfold)."""

    def __init__(self, weights: dict, originals: dict):
        self.weights = dict(weights)
        self.originals = originals  # id(parameter) -> (parameter, its data before the fold)

    def restore(self) -> None:
        """Every written parameter's data back as it was, bit for bit (the parameter objects never changed)."""
        for current, saved in self.originals.values():
            current.data = saved
        self.originals = {}


def check_quantized_merge(quantized: str) -> None:
    if quantized not in QUANTIZED_MERGES:
        raise ValueError(f"quantized must be one of {QUANTIZED_MERGES}, not {quantized!r}")


def checked_fold(compiled, weights: dict, *, verify: bool, inplace: bool, gated: bool, args: tuple, kwargs: dict,
                 quantized: str) -> tuple[Folded, dict | None]:
    """(the Folded model of ``compiled`` with ``weights`` (adapter -> strength), the quantized-fold report or None).

    The fold is checked on ``args``/``kwargs`` against the unfolded graph run with ``weights`` as its gates
    (``gated``: the weights were asked for, not the gates as they are). Raises FoldError when the outputs
    differ, or when ``inplace`` is asked for what cannot be written in place (refused before anything is).
    """
    sites = compiled.plan.sites
    quantized_sites = sum(1 for s in sites if s.quantization and weights.get(s.adapter, 0.0))
    if quantized_sites and inplace:
        raise FoldError(f"cannot fold in place: {quantized_sites} adapted sites have quantized weights (bitsandbytes)",
                        hint="fold() without inplace=True gives the merged graph; save_pretrained() the merged checkpoint")
    if inplace:
        refuse_tied_in_place(compiled.base_model, compiled.captured.sites, compiled.sites(), weights)
    folded = Folded(compiled, weights, quantized)
    unfolded = compiled.graph(*args, training=False, lowered=False, **kwargs)
    gates = weights if gated or quantized_sites else None  # the reference: the graph with the asked weights as gates
    reference = _reference_outputs(compiled, unfolded, gates, args, kwargs) if verify or quantized_sites else None
    graph = folded.graph(*args, **kwargs)
    report = None
    if quantized_sites:  # the report is the check: a requantized merge differs by design
        worst, mean = output_difference(reference, _outputs(graph, args, kwargs))
        report = {"quantized_sites": quantized_sites, "quantized": quantized,
                  "max_abs_output_difference": worst, "mean_abs_output_difference": mean}
        if verify and quantized == "dequantize":
            verify_fold(lambda *a, **k: reference, graph, args, kwargs, _quantized_tolerance(sites))
    elif verify:
        verify_fold(lambda *a, **k: reference, graph, args, kwargs)
    return folded, report


def refuse_tied_in_place(base_model: nn.Module, captured_sites: dict, sites, weights: dict) -> None:
    """An in-place fold cannot give one of two tied names a weight of its own (PEFT unties; we refuse).

    ``sites``: (adapter, path, SiteAdapter) of every adapter site; ``captured_sites``: path -> captured site."""
    shared: dict = {}
    for name, tensor in base_model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(tensor), []).append(name)
    for adapter, path, module in sites:
        name = captured_sites[path].weight if path in captured_sites else f"{path}.weight"
        tensor = base_model.get_parameter(name)
        if weights.get(adapter, 0.0) and len(shared[id(tensor)]) > 1 and not getattr(module, "follows_ties", False):
            raise FoldError(
                f"cannot fold into {name} in place: the tensor is shared with another weight (tied embeddings)",
                hint="fold() without inplace=True gives the merged model and leaves the tie alone",
            )


def write_in_place(base_model: nn.Module, folded: Folded) -> InPlace:
    """Every merged tensor of ``folded`` into ``base_model``'s parameter of that name. The parameter objects
    stay (graphs, optimizers and the user hold them); their data is swapped, and the original data kept
    for unfold: no copy of either (PEFT's safe merge swaps .data the same way)."""
    originals = {}
    with torch.no_grad():
        for name, value in folded.state_dict().items():
            try:
                current = base_model.get_parameter(name)
            except AttributeError:
                continue  # a buffer: folds change weights only
            if value is current or value.data_ptr() == current.data_ptr():
                continue
            if id(current) not in originals:  # a tied name: written once
                originals[id(current)] = (current, current.data)
                current.data = value.to(current.dtype)
    return InPlace(folded.weights, originals)


def _reference_outputs(compiled, unfolded, weights: dict | None, args, kwargs):
    """The unfolded graph's outputs, with ``weights`` (adapter -> strength) as its gates when given."""
    if weights is None:
        return _outputs(unfolded, args, kwargs)
    saved = compiled.adapter_gates.clone()
    compiled.set_gates(weights)
    try:
        return _outputs(unfolded, args, kwargs)
    finally:
        with torch.no_grad():
            compiled.adapter_gates.copy_(saved)


def _quantized_tolerance(sites):
    """(rtol, atol) for verifying a dequantizing fold: LLM.int8 rounds the activations of the unfolded
    graph to 8 bits (the folded one does not); a 4-bit site computes the same dequantized product, with
    the merged weight rounded once to its compute dtype."""
    described = " ".join(s.quantization for s in sites if s.quantization)
    if "int8" in described:
        return (5e-2, 5e-2)
    return next((TOLERANCES[d] for d in ("bfloat16", "float16") if f"compute {d}" in described), None)


def _outputs(gm, args, kwargs):
    with torch.no_grad():
        out = gm(*args, **kwargs)
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
