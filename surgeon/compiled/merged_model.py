"""Folded: the merged model, a compiled model's adapters merged into its weights, called like the model it came from.

``Compiled.fold()`` returns a :class:`Folded`, as PEFT's ``merge_and_unload()``
returns the base model: it takes the same keyword arguments as the base model
(``labels`` and ``use_cache`` stay optional) and returns the same output class.
Each call signature gets its graph, made from the compiled model's evaluation
graph for that signature by the fold pass, which leaves exactly the base graph's
op sequence on merged weights:

    W' = fold(W)          every adapted site (passes/fold.py; the method's math)
    P' = lerp(P, P_t, w)  every parameter of a trained module (w: its adapters' weight; trained_modules.py)

The merged tensors are computed once, at ``fold()``, checked there against the
unfolded graph (``verify``, checked_fold.py), and kept by site: every graph of a Folded reads the
same tensors, a merged checkpoint is the base state dict with them in place
(:meth:`Folded.state_dict`), and an in-place fold writes them into the model.
Training the compiled model further does not change a Folded made before.
"""

from __future__ import annotations

import inspect

from torch import nn

from surgeon.checkpoints.merged import check_merged_checkpoint, write_merged_checkpoint
from surgeon.diagnostics import SurgeryError
from surgeon.passes import Pipeline, copy_graph_module, fold_adapters
from surgeon.passes.fold import FoldError
from surgeon.passes.fold_quantized import merged_quantized_state

from surgeon.compiled.checkpointing import export_program
from surgeon.compiled.distributed import refuse_sharded, writes_files
from surgeon.compiled.generation import generate
from surgeon.compiled.trained_modules import fold_trained_modules

__all__ = ["Folded"]


class Folded(nn.Module):
    """The merged model (see the module docstring). Build it with ``Compiled.fold()``."""

    def __init__(self, compiled, weights: dict, quantized: str = "dequantize", *, identity: bool = False):
        super().__init__()
        self.__dict__["_compiled"] = compiled  # not a submodule: its adapters are not the folded model's
        self.__dict__["_graphs"] = {}
        # (path, kind) -> (weight, bias) of each folded site, ("quantized", weight) of a quantized one, and
        # ("trained", parameter name) -> tensor: filled by the first graph's passes, read by every later one
        self.__dict__["merged"] = {}
        self.weights = dict(weights)  # adapter -> the strength it was folded with
        self.quantized = quantized
        self.identity = identity  # the model's own weights are merged already (an in-place fold)
        self.eval()

        def forward(*args, **kwargs):
            return Folded.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(compiled.base_model.forward)  # Trainer and pipelines read it
        forward.__doc__ = Folded.forward.__doc__
        self.__dict__["forward"] = forward

    @property
    def config(self):
        return getattr(self._compiled.base_model, "config", None)

    def graph(self, *args, **kwargs):
        """The folded graph module for this call signature (default: the compiled model's example inputs)."""
        compiled = self._compiled
        if self.identity and not compiled.folded_in_place:
            raise FoldError("this folded model read the weights of an in-place fold, which unfold() took back",
                            hint="fold() again")
        if not args and not kwargs:
            args, kwargs = compiled.example_args, dict(compiled.example_kwargs)
        kwargs = compiled.with_defaults(kwargs)
        key = compiled.signature_key(args, kwargs)
        if key not in self._graphs:
            self._graphs[key] = self._fold_graph(args, kwargs)
        return self._graphs[key]

    def _fold_graph(self, args, kwargs):
        compiled = self._compiled
        unfolded = compiled.graph(*args, training=False, lowered=False, **kwargs)  # folding reads the plain branches
        if self.identity:
            return unfolded  # the base graph of a model folded in place: its weights are the merged ones
        return self.fold_graph(unfolded)

    def fold_graph(self, unfolded):
        """A copy of the compiled model's unlowered evaluation graph ``unfolded`` with the adapters folded in."""
        compiled = self._compiled
        if self._graphs and compiled.site_signature() != self._sites:
            raise FoldError("the compiled model's adapters changed after this fold: its sites are not the folded ones",
                            hint="fold() again for a model of the new adapters")
        self.__dict__["_sites"] = compiled.site_signature()
        folded = copy_graph_module(unfolded)
        fold_pass = fold_adapters(compiled.insertions(), weights=self.weights, quantized=self.quantized, merged=self.merged)
        trained = fold_trained_modules(tuple(compiled.plan.trained), self.weights, self.merged)
        stages = Pipeline.with_points({"fold": [trained, fold_pass]}, compiled.user_passes)
        return stages.run(folded, lint=compiled.lint).graph_module

    def forward(self, *args, **kwargs):
        """Call the merged model like the base model (a graph per call signature, made on first use)."""
        kwargs = self._compiled.with_defaults(kwargs)
        return self.graph(*args, **kwargs)(*args, **kwargs)

    def generate(self, input_ids, attention_mask=None, **options):
        """Generate with the merged weights, as :meth:`Compiled.generate` (no ``adapter_ids``: nothing to route)."""
        return generate(self._compiled, input_ids, attention_mask, folded=self, **options)

    def train(self, mode: bool = True):
        if mode:
            raise SurgeryError("a folded model is for evaluation only", hint="train the compiled model, then fold() again")
        return super().train(False)

    def state_dict(self, *args, **kwargs) -> dict:
        """The base model's state dict with the merged tensors in place (what a merged checkpoint holds).

        Quantized sites (bitsandbytes): ``quantized`` = "dequantize" gives every quantized linear in full
        precision, merged or not; "requantize" quantizes the merged ones again with their own scheme.
        """
        compiled = self._compiled
        model = compiled.base_model
        if not self.merged and not self.identity:
            self.graph()  # the fold, at the example inputs
        state = dict(model.state_dict())
        if self.identity:
            return state
        sites = {(s.path, s.kind): s for s in compiled.plan.sites}
        quantized = {}
        for key, entry in self.merged.items():
            if key[0] == "trained":
                state[key[1]] = entry.detach()
                continue
            if len(key) == 3:  # a site's second weight (MultiheadAttention's out_proj), under its own name
                state[key[2]] = entry[0].detach()
                continue
            path, kind = key
            site = sites[key]
            weight_name = compiled.captured.sites[path].weight if path in compiled.captured.sites else f"{path}.weight"
            if entry[0] == "quantized":
                quantized[weight_name] = entry[1]
                continue
            weight, bias = entry
            state[weight_name] = weight.detach()
            if bias is not None:
                state[f"{path}.bias"] = bias.detach()
            if any(getattr(compiled.adapter_module(s.adapter, path), "follows_ties", False) for s in compiled.plan.sites
                   if s.path == path):
                for tied in site.tied_with:  # tied readers that see the change (trainable tokens) get it too
                    if tied in state:
                        state[tied] = weight.detach()
        if any(s.quantization for s in compiled.captured.sites.values()):
            state = merged_quantized_state(model, state, quantized, self.quantized)
        return state

    def save_pretrained(self, directory) -> None:
        """This merged model as a Hugging Face checkpoint (config, ``model.safetensors``); the folder is replaced
        whole (surgeon/checkpoints/merged.py). In a process group, rank 0 writes."""
        compiled = self._compiled
        refuse_sharded(compiled, "save_pretrained")
        if not writes_files():
            return
        # Adapters whose change the tied readers see too (trainable tokens) keep the tie; others would break it.
        changed = {f"{path}.weight" for name, path, adapter in compiled.sites()
                   if self.weights.get(name, 0.0) and not getattr(adapter, "follows_ties", False)}
        check_merged_checkpoint(compiled.base_model, changed, compiled.captured.ties)
        write_merged_checkpoint(compiled.base_model, self.state_dict(), directory, dequantized=self.quantized == "dequantize")

    def export(self, path, *, args: tuple = (), kwargs: dict | None = None) -> None:
        """This merged model's graph (for ``args``/``kwargs``, default the example inputs) as a ``.pt2`` program."""
        export_program(self._compiled, path, fold=True, args=args, kwargs=kwargs, quantized=self.quantized, folded=self)

    def extra_repr(self) -> str:
        folded = ", ".join(f"{name}={w:g}" for name, w in self.weights.items() if w)
        return f"{self._compiled.name}: {folded or 'no adapter'} folded" + (" (in place)" if self.identity else "")
