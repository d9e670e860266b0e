"""Folding: a compiled model's adapters merged into its base weights (the ``Folding`` mixin of Compiled).

``fold()`` gives the merged evaluation graph (the base graph's op sequence
with folded weights, verified against the unfolded graph), ``fold(inplace=
True)`` / ``unfold()`` write into and restore the base model's own tensors,
``merged_state_dict()`` the merged weights for a checkpoint. Sites on
bitsandbytes weights merge from their dequantized weights, then stay in
full precision or are quantized again (surgeon/quantized.py).
"""

from __future__ import annotations

import torch

from surgeon.passes import Insertion, Pipeline, copy_graph_module, fold_adapters, unfold_inplace, verify_fold
from surgeon.passes.fold import merge_dtype, output_difference

from .distributed import refuse_sharded
from .switching import fold_trained_modules

__all__ = ["Folding"]


class Folding:
    """fold / unfold / merged_state_dict for :class:`surgeon.compiled.Compiled`."""

    def fold(self, *, adapters: dict | None = None, inplace: bool = False, verify: bool = True, args: tuple = (),
             kwargs: dict | None = None, quantized: str = "dequantize"):
        """The merged evaluation graph: the adapters folded into their base weights.

        ``adapters`` (name -> weight) chooses which adapters fold and how
        strongly (default: the active ones, with their gates). The compiled
        model keeps its adapters. With ``inplace=True`` the merged weights are
        written into the base model's own tensors (as PEFT's
        ``merge_and_unload``); :meth:`unfold` restores them bit for bit.
        Sites on bitsandbytes weights merge in full precision; ``quantized``
        says what the folded graph holds there: "dequantize" (the merged
        weight in the compute dtype) or "requantize" (quantized again, which
        adds error; not verified). After such a fold ``fold_report`` gives the
        folded graph's max and mean absolute output difference from the unfolded one.
        """
        refuse_sharded(self, "fold")
        from surgeon.quantized_merge import QUANTIZED_MERGES

        if quantized not in QUANTIZED_MERGES:
            raise ValueError(f"quantized must be one of {QUANTIZED_MERGES}, not {quantized!r}")
        weights = self._fold_weights(adapters)
        self.fold_report = None
        quantized_sites = sum(1 for s in self.plan.sites if s.quantization and weights.get(s.adapter, 0.0))
        if quantized_sites and inplace:  # refused before anything is written
            from surgeon.passes.fold import FoldError

            raise FoldError(f"cannot fold in place: {quantized_sites} adapted sites have quantized weights (bitsandbytes)",
                            hint="fold() without inplace=True gives the merged graph; save_pretrained() the merged checkpoint")
        args = args or self.example_args
        kwargs = self._with_defaults(dict(kwargs) if kwargs is not None else dict(self.example_kwargs))
        unfolded = self.graph(*args, training=False, lowered=False, **kwargs)  # folding reads the plain branches
        folded = copy_graph_module(unfolded)
        fold_pass = fold_adapters(self._insertions(), inplace=inplace, originals=self._inplace_originals, weights=weights,
                                  quantized=quantized)
        stages = Pipeline.with_points({"fold": [fold_trained_modules(self, weights), fold_pass]}, self.user_passes)
        if quantized_sites:  # the report is the check: a requantized merge differs by design
            reference = self._reference_outputs(unfolded, weights if adapters is not None else None, args, kwargs)
            stages.run(folded, lint=self.lint)
            worst, mean = output_difference(reference, _outputs(folded, args, kwargs))
            self.fold_report = {"quantized_sites": quantized_sites, "quantized": quantized,
                                "max_abs_output_difference": worst, "mean_abs_output_difference": mean}
            if verify and quantized == "dequantize":
                verify_fold(lambda *a, **k: reference, folded, args, kwargs, _quantized_tolerance(self.plan.sites))
            return folded
        if adapters is not None and verify:  # the reference: the graph with the asked weights as gates
            reference = self._reference_outputs(unfolded, weights, args, kwargs)
            stages.run(folded, lint=self.lint)
            verify_fold(lambda *a, **k: reference, folded, args, kwargs)
            return folded
        if inplace:
            reference = _outputs(unfolded, args, kwargs) if verify else None
            stages.run(folded, lint=self.lint)
            if verify:
                verify_fold(lambda *a, **k: reference, folded, args, kwargs)
            return folded
        stages.run(folded, lint=self.lint)
        if verify:
            verify_fold(unfolded, folded, args, kwargs)
        return folded

    def _reference_outputs(self, unfolded, weights: dict | None, args, kwargs):
        """The unfolded graph's outputs, with ``weights`` (adapter -> strength) as its gates when given."""
        if weights is None:
            return _outputs(unfolded, args, kwargs)
        saved = self.adapter_gates.clone()
        self.set_gates(weights)
        try:
            return _outputs(unfolded, args, kwargs)
        finally:
            with torch.no_grad():
                self.adapter_gates.copy_(saved)

    def unfold(self) -> None:
        """Undo ``fold(inplace=True)``: the base weights come back bit for bit."""
        unfold_inplace(self._inplace_originals)  # into the same tensors: the captured graphs stay valid

    def merged_state_dict(self, adapters: dict | None = None, quantized: str = "dequantize") -> dict:
        """The base model's state dict with the adapters folded in (new tensors; nothing changes in place).

        ``adapters`` (name -> weight) as for :meth:`fold`; default the active adapters with their gates.
        A bitsandbytes model's quantized linears are merged from their dequantized weights;
        ``quantized`` = "dequantize" gives every one of them in full precision (no quantization left),
        "requantize" quantizes the merged ones again with their own scheme.
        """
        refuse_sharded(self, "merged_state_dict")
        from surgeon.passes.fold import fold_weighted
        from surgeon.quantized import dequantized_weight
        from surgeon.quantized_merge import QUANTIZED_MERGES, merged_quantized_state

        if quantized not in QUANTIZED_MERGES:
            raise ValueError(f"quantized must be one of {QUANTIZED_MERGES}, not {quantized!r}")
        weights = self._fold_weights(adapters)
        state = dict(self.base_model.state_dict())
        merged: dict = {}  # weight name -> (weight, bias) in the merge dtype, folded adapter after adapter
        with torch.no_grad():
            for site in self.plan.sites:
                if weights.get(site.adapter, 0.0) == 0:
                    continue
                name, bias_name = f"{site.path}.weight", f"{site.path}.bias"
                wide = merge_dtype(state[name].dtype)
                start = dequantized_weight(self.base_model.get_submodule(site.path), wide) if site.quantization else state[name].to(wide)
                weight, bias = merged.get(name) or (start, state[bias_name].to(wide) if bias_name in state else None)
                spec = Insertion(site.path, site.kind, site.adapter, self.adapter_module(site.adapter, site.path))
                merged[name] = fold_weighted(spec, weight, bias, site.kind, weights[site.adapter])
            for site in self.plan.sites:  # tied readers that see the change get the merged weight too
                if weights.get(site.adapter, 0.0) and getattr(self.adapter_module(site.adapter, site.path), "follows_ties", False):
                    for tied in site.tied_with:
                        if tied in state:
                            merged[tied] = merged[f"{site.path}.weight"]
            if any(s.quantization for s in self.captured.sites.values()):
                quantized_names = {f"{s.path}.weight" for s in self.plan.sites if s.quantization}
                state = merged_quantized_state(self.base_model, state, {n: merged[n][0] for n in merged if n in quantized_names}, quantized)
                merged = {n: (None, b) if n in quantized_names else (w, b) for n, (w, b) in merged.items()}
            for name, (weight, bias) in merged.items():
                bias_name = name[: -len("weight")] + "bias"
                if bias is not None and bias_name in state:
                    state[bias_name] = bias.to(state[bias_name].dtype)
                if weight is not None:
                    state[name] = weight.to(state[name].dtype)
            for key, module in self.trained.items():
                path = key.replace("__", ".")
                w = max((weights.get(t.adapter, 0.0) for t in self.plan.trained if t.path == path), default=0.0)
                for name, param in module.state_dict().items():
                    base = state[f"{path}.{name}"]
                    state[f"{path}.{name}"] = param.detach() if w == 1 else base if w == 0 else torch.lerp(base, param.detach().to(base.dtype), w)
        return state


def _quantized_tolerance(sites):
    """(rtol, atol) for verifying a dequantizing fold: LLM.int8 rounds the activations of the unfolded
    graph to 8 bits (the folded one does not); a 4-bit site computes the same dequantized product, with
    the merged weight rounded once to its compute dtype."""
    from surgeon.passes.fold import TOLERANCES

    described = " ".join(s.quantization for s in sites if s.quantization)
    if "int8" in described:
        return (5e-2, 5e-2)
    return next((TOLERANCES[d] for d in ("bfloat16", "float16") if f"compute {d}" in described), None)


def _outputs(gm, args, kwargs):
    with torch.no_grad():
        out = gm(*args, **kwargs)
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
