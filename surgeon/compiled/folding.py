"""Folding: a compiled model's adapters merged into its base weights (the ``Folding`` mixin of Compiled).

There is one fold: ``fold()`` runs the fold pass on the evaluation graph and
checks the merged graph against the unfolded one (surgeon/compiled/folded.py). Every
merged artifact comes from it: the :class:`~surgeon.compiled.folded.Folded` model it
returns, ``merged_state_dict()`` and the merged checkpoint (its
``state_dict()``), the merged program, and ``fold(inplace=True)``, which writes
its tensors into the base model's own parameters. While folded in place the
compiled model runs the base graph (the adapters are in the weights), as a
merged PEFT layer does, until ``unfold()`` restores every tensor bit for bit.
Sites on bitsandbytes weights merge from their dequantized weights, then stay
in full precision or are quantized again (passes/fold_quantized.py).
"""

from __future__ import annotations

import torch

from surgeon.passes import verify_fold
from surgeon.passes.fold import FoldError, output_difference

from surgeon.compiled.distributed import refuse_sharded
from surgeon.compiled.folded import Folded

__all__ = ["Folding"]


class Folding:
    """fold / unfold / merged_state_dict for :class:`surgeon.compiled.model.Compiled`."""

    @property
    def folded_in_place(self) -> bool:
        """Are the adapters folded into the base model's own weights (``fold(inplace=True)``, until ``unfold()``)?"""
        return self.__dict__.get("_in_place") is not None

    def fold(self, *, adapters: dict | None = None, inplace: bool = False, verify: bool = True, args: tuple = (),
             kwargs: dict | None = None, quantized: str = "dequantize"):
        """The merged model: the adapters folded into their base weights, called like the base model.

        ``adapters`` (name -> weight) chooses which adapters fold and how
        strongly (default: the active ones, with their gates). The compiled
        model keeps its adapters. The fold is checked on ``args``/``kwargs``
        (default: the example inputs) against the unfolded graph. With
        ``inplace=True`` the merged weights (and the trained copies of
        ``train`` modules) are written into the base model's own tensors, as
        PEFT's ``merge_and_unload``, and the base model is returned; the
        compiled model then computes with the merged weights only, and
        :meth:`unfold` restores them bit for bit.
        Sites on bitsandbytes weights merge in full precision; ``quantized``
        says what the folded graph holds there: "dequantize" (the merged
        weight in the compute dtype) or "requantize" (quantized again, which
        adds error; not verified). After such a fold ``fold_report`` gives the
        folded graph's max and mean absolute output difference from the unfolded one.
        """
        refuse_sharded(self, "fold")
        from surgeon.passes.fold_quantized import QUANTIZED_MERGES

        if quantized not in QUANTIZED_MERGES:
            raise ValueError(f"quantized must be one of {QUANTIZED_MERGES}, not {quantized!r}")
        if self.folded_in_place:
            if inplace or adapters is not None:
                raise FoldError("the adapters are folded into the base weights already (fold(inplace=True))",
                                hint="unfold() first, then fold again")
            return Folded(self, self._in_place, quantized, identity=True)
        weights = self._fold_weights(adapters)
        self.fold_report = None
        quantized_sites = sum(1 for s in self.plan.sites if s.quantization and weights.get(s.adapter, 0.0))
        if quantized_sites and inplace:  # refused before anything is written
            raise FoldError(f"cannot fold in place: {quantized_sites} adapted sites have quantized weights (bitsandbytes)",
                            hint="fold() without inplace=True gives the merged graph; save_pretrained() the merged checkpoint")
        if inplace:
            self._refuse_tied_in_place(weights)
        args = args or self.example_args
        kwargs = self._with_defaults(dict(kwargs) if kwargs is not None else dict(self.example_kwargs))
        folded = Folded(self, weights, quantized)
        unfolded = self.graph(*args, training=False, lowered=False, **kwargs)
        gated = adapters is not None or quantized_sites  # the reference: the graph with the asked weights as gates
        reference = self._reference_outputs(unfolded, weights if gated else None, args, kwargs) if verify or quantized_sites else None
        graph = folded.graph(*args, **kwargs)
        if quantized_sites:  # the report is the check: a requantized merge differs by design
            worst, mean = output_difference(reference, _outputs(graph, args, kwargs))
            self.fold_report = {"quantized_sites": quantized_sites, "quantized": quantized,
                                "max_abs_output_difference": worst, "mean_abs_output_difference": mean}
            if verify and quantized == "dequantize":
                verify_fold(lambda *a, **k: reference, graph, args, kwargs, _quantized_tolerance(self.plan.sites))
        elif verify:
            verify_fold(lambda *a, **k: reference, graph, args, kwargs)
        if inplace:
            self._write_in_place(folded)
            return self.base_model
        return folded

    def _refuse_tied_in_place(self, weights: dict) -> None:
        """An in-place fold cannot give one of two tied names a weight of its own (PEFT unties; we refuse)."""
        shared: dict = {}
        for name, tensor in self.base_model.named_parameters(remove_duplicate=False):
            shared.setdefault(id(tensor), []).append(name)
        for adapter, path, module in self.sites():
            name = self.captured.sites[path].weight if path in self.captured.sites else f"{path}.weight"
            tensor = self.base_model.get_parameter(name)
            if weights.get(adapter, 0.0) and len(shared[id(tensor)]) > 1 and not getattr(module, "follows_ties", False):
                raise FoldError(
                    f"cannot fold into {name} in place: the tensor is shared with another weight (tied embeddings)",
                    hint="fold() without inplace=True gives the merged model and leaves the tie alone",
                )

    def _write_in_place(self, folded: Folded) -> None:
        """Every merged tensor of ``folded`` into the base model's parameter of that name. The parameter objects
        stay (graphs, optimizers and the user hold them); their data is swapped, and the original data kept
        for unfold: no copy of either (PEFT's safe merge swaps .data the same way)."""
        originals = {}
        with torch.no_grad():
            for name, value in folded.state_dict().items():
                try:
                    current = self.base_model.get_parameter(name)
                except AttributeError:
                    continue  # a buffer: folds change weights only
                if value is current or value.data_ptr() == current.data_ptr():
                    continue
                if id(current) not in originals:  # a tied name: written once
                    originals[id(current)] = (current, current.data)
                    current.data = value.to(current.dtype)
        self.__dict__["_in_place"] = dict(folded.weights)
        self.__dict__["_inplace_originals"] = originals
        self.invalidate()  # the graphs with adapter branches would add them to the merged weights again

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
        """Undo ``fold(inplace=True)``: the base weights (and modules trained by ``train`` rules) come back bit for bit."""
        for current, saved in self.__dict__.get("_inplace_originals", {}).values():
            current.data = saved
        self.__dict__["_inplace_originals"] = {}
        if self.folded_in_place:
            self.__dict__["_in_place"] = None
            self.invalidate()

    def merged_state_dict(self, adapters: dict | None = None, quantized: str = "dequantize") -> dict:
        """The base model's state dict with the adapters folded in (new tensors; nothing changes in place):
        ``fold(adapters=adapters, quantized=quantized).state_dict()``, verified like every fold."""
        refuse_sharded(self, "merged_state_dict")
        return self.fold(adapters=adapters, quantized=quantized).state_dict()


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
