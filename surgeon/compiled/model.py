"""Compiled: a model with its adapters inserted into captured graphs.

A :class:`Compiled` is an ``nn.Module``: optimizers, ``.to()``,
``state_dict()`` and training loops use it like the model it came from, and it
is called with the same keyword arguments, returning the same output class.

Inside, the adapter parameters (``adapters.<name>.<site>.<parameter>``) and the
trainable copies of ``train`` modules are the source of truth. Graphs are made
on demand, one per (training mode, lowering, autocast, call signature), by
capturing the base model with ``torch.export`` and running the pass pipeline
on the result (adapted_graph.py); every graph references the very same
parameters, so ``.train()`` and ``.eval()`` switch between a graph with dropout
and one without, and training either updates the same weights. A graph is
captured the first time a call needs it, in ``__call__`` before ``forward``
runs (outside a ``torch.compile`` trace, which then finds it), and again after
``.to()`` or a change of adapters. Base parameters are frozen, as PEFT does,
and never changed unless ``fold(inplace=True)`` is asked for (until ``unfold()``).

This class is the module facade and that graph cache; the rest acts on it
beside it, through its public members: building.py (parameters), staging.py
(adding and replacing adapters), gates.py (which adapters act), lowering.py
(kernel choice), checked_fold.py and merged_model.py (folding), low_rank.py
(merging, hot swaps), checkpointing.py (files), eager.py, distributed.py.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from surgeon.capture.export import autocast_state, bind_program
from surgeon.diagnostics import SurgeryError
from surgeon.grammar import rules as ir
from surgeon.methods.adapter import SiteAdapter
from surgeon.passes import Insertion, Pipeline
from surgeon.passes.fold import FoldError
from surgeon.passes.insert import ROUTING_INPUT, Gates
from surgeon.planning.plan import Plan

from surgeon.compiled import building, checkpointing, eager, generation, low_rank, staging
from surgeon.compiled.adapted_graph import BINDINGS, adapted_graph, exported, unadapted_graph
from surgeon.compiled.checked_fold import check_quantized_merge, checked_fold, write_in_place
from surgeon.compiled.distributed import check_sharding, is_sharded, rebind, refuse_sharded
from surgeon.compiled.gates import (active_names, checked_ids, fold_weights, gates_for, gates_zeroed, selected_weights,
                                    train_active_only)
from surgeon.compiled.lowering import KernelChoice, Lowering
from surgeon.compiled.merged_model import Folded

__all__ = ["Compiled"]


class Compiled(nn.Module):
    """The adapted model. Build it with :func:`surgeon.compile`."""

    def __init__(self, captured, rule_set: ir.RuleSet, plan: Plan, *, passes: dict | None = None, lint: bool = True,
                 adapter_dtype: torch.dtype | None = None, kernels: str = "auto"):
        super().__init__()
        opened = captured.opened
        self.base_model = opened.module
        self.adapters = nn.ModuleDict()  # adapter -> site key -> SiteAdapter
        self.trained = nn.ModuleDict()  # site key -> the trainable copy of a ``train`` module
        # Plain attributes (not submodules): graphs share the parameters above.
        self.__dict__["_graphs"] = {}
        self.__dict__["_in_place"] = None  # a checked_fold.InPlace while folded in place
        self.__dict__["_kernel_choice"] = KernelChoice(kernels)
        self.fold_report: dict | None = None  # set by a fold of quantized sites (see fold)
        self.loftq_report: dict = {}  # site -> ||W - Q||, ||W - Q - s B A|| of LoftQ-started sites
        self.__dict__["captured"] = captured  # the planning capture: modules and sites
        self.adapter_dtype = adapter_dtype
        self.name = opened.name
        self.rules = rule_set
        self.plan = plan
        self.user_passes = dict(passes or {})
        self.lint = lint
        self.hugging_face = opened.is_hugging_face
        self.example_args, self.example_kwargs = opened.example_args, opened.example_kwargs
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self.register_buffer("adapter_gates", torch.ones(0), persistent=False)  # one per adapter (gates.py)
        staging.build_missing(self, adapter_dtype)
        self.adapter_gates = gates_for(self.adapter_names, {})
        Pipeline.with_points({}, self.user_passes)  # refuse unknown pass points now, not at the first call
        self.lowering()  # decided before any torch.compile traces a call
        self._advertise_signature()

    def _advertise_signature(self) -> None:
        """Show the base model's forward signature (transformers' Trainer reads it to pick input columns)."""

        def forward(*args, **kwargs):
            return Compiled.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(self.base_model.forward)
        forward.__doc__ = Compiled.forward.__doc__
        self.__dict__["forward"] = forward

    # --- adapters -------------------------------------------------------------------------

    @property
    def kernels(self) -> str:
        """Which branches graphs hand to the fused ops: "auto", "triton" or "torch" (lowering.py)."""
        return self._kernel_choice.kernels

    @property
    def adapter_names(self) -> tuple:
        """Every adapter, in the order declared in the rules, then loaded (``adapter_ids`` index this)."""
        return tuple(self.rules.adapter_names)

    @property
    def config(self):
        return getattr(self.base_model, "config", None)

    def site_module(self, site, plan: Plan, rules: ir.RuleSet, adapter_dtype=None, device=None, conv1d=None) -> SiteAdapter:
        """A new SiteAdapter for plan site ``site`` (``device="meta"``: its shapes only, nothing allocated or started)."""
        return building.site_module(self.captured, self.base_model, site, plan, rules, adapter_dtype, device=device,
                                    conv1d=conv1d, loftq_report=self.loftq_report)

    def add_adapter(self, name: str, rules: ir.RuleSet) -> None:
        """Add (or replace) adapter ``name`` with the rules of ``rules`` (all its adapters' rules, merged).

        Planned and built aside first (staging.py): an error leaves the model as it was."""
        staging.commit_adapter(self, staging.stage_adapter(self, name, rules))

    def adapter_module(self, adapter: str, path: str) -> SiteAdapter:
        """The parameters (and method) of adapter ``adapter`` on site ``path``."""
        return self.adapters[adapter][building.site_key(path)]

    def sites(self):
        """(adapter, path, SiteAdapter) for every adapter site, in plan order."""
        for site in self.plan.sites:
            yield site.adapter, site.path, self.adapter_module(site.adapter, site.path)

    def trainable_parameters(self) -> list:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        total = sum(p.numel() for p in self.base_model.parameters()) + sum(p.numel() for p in self.adapters.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # --- which adapters act (gates.py) ------------------------------------------------------

    @property
    def active_adapters(self) -> tuple:
        return active_names(self.adapter_names, self.adapter_gates)

    def set_active(self, names=None, weights=None) -> None:
        """Make ``names`` (one, several, or None for none) the adapters that act, without a new graph.

        ``weights`` gives each active adapter its own strength (default 1).
        The others stop acting, and in training stop training too: their
        parameters get ``requires_grad=False``, as PEFT's ``set_adapter`` does
        (in eval mode that waits for ``.train()``, so that switching adapters
        while serving a ``torch.compile``d model changes tensors only and never
        recompiles).
        """
        self.set_gates(selected_weights(self.adapter_names, names, weights))
        if self.training:
            train_active_only(self.adapters, self.trained, self.plan, self.active_adapters)

    def set_gates(self, weights: dict) -> None:
        """Set each adapter's gate (name -> strength; absent names 0), leaving requires_grad alone."""
        with torch.no_grad():
            self.adapter_gates.copy_(gates_for(self.adapter_names, {n: weights.get(n, 0.0) for n in self.adapter_names}))

    @contextlib.contextmanager
    def disabled(self):
        """``with compiled.disabled():`` runs the base model (every gate 0), then restores the gates."""
        with gates_zeroed(self.adapter_gates):
            yield self

    def train(self, mode: bool = True):
        result = super().train(mode)
        if mode:
            train_active_only(self.adapters, self.trained, self.plan, self.active_adapters)
        return result

    # --- merging and hot-swapping low-rank adapters (low_rank.py) ----------------------------

    def merge(self, name: str, sources: dict, combination: str = "linear", *, replace: bool = False, **options) -> str:
        """A new adapter ``name``: ``combination`` of ``sources`` (name -> weight), as PEFT's ``add_weighted_adapter``
        (options ``density``, ``majority_sign``, ``svd_rank``, ``svd_clamp``; each type's math: merge_math.py)."""
        return low_rank.merge_adapters(self, name, sources, combination, replace=replace, **options)

    def swap_adapter(self, name: str, directory) -> None:
        """Replace adapter ``name``'s LoRA weights by those of the PEFT adapter in ``directory``, in place: no new
        graph, no recompile (smaller ranks zero-padded, scales folded into B: surgeon/checkpoints/hot_swap.py)."""
        low_rank.swap_adapter(self, name, directory)

    # --- graphs -------------------------------------------------------------------------

    def insertions(self) -> list:
        """Every planned site as the passes take it (path, kind, adapter, SiteAdapter)."""
        return [Insertion(s.path, s.kind, s.adapter, self.adapter_module(s.adapter, s.path)) for s in self.plan.sites]

    def site_signature(self) -> tuple:
        """What a fold depends on besides tensors: every (adapter, site, kind, method) and trained module."""
        return tuple((s.adapter, s.path, s.kind, s.method) for s in self.plan.sites) + tuple((t.adapter, t.path) for t in self.plan.trained)

    @staticmethod
    def signature_key(args: tuple, kwargs: dict) -> tuple:
        """A call's signature as a graph-cache key: each tensor by rank and dtype, anything else by repr."""
        def static(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", v.dim(), v.dtype)
            return repr(v)

        return (tuple(static(a) for a in args), tuple(sorted((k, static(v)) for k, v in kwargs.items())))

    def with_defaults(self, kwargs: dict) -> dict:
        """``kwargs`` as a graph is called with them: Hugging Face models return a KV cache unless told not to."""
        if self.hugging_face and "use_cache" not in kwargs and "use_cache" in self.example_kwargs:
            kwargs = {**kwargs, "use_cache": False}
        return kwargs


    def graph(self, *args, training: bool | None = None, lowered: bool | None = None, **kwargs):
        """The adapted graph module for this call signature (captured on first use).

        ``lowered``: branches as fused kernel calls (True: every site a fused op serves; default: as ``kernels`` decides).
        """
        kwargs = self.with_defaults(kwargs)
        training = self.training if training is None else training
        autocast = autocast_state(self.base_model)  # export keeps the dtypes it traced: a graph per autocast state
        if lowered is None:  # under autocast the plain aten ops (the fused ops take one dtype); else as kernels says
            lowering = Lowering.NONE if autocast is not None else self.lowering()
        else:
            lowering = Lowering.of(lowered)
        key = (training, lowering, autocast) + self.signature_key(args, kwargs)  # a routed call (adapter_ids) has its own
        if key not in self._graphs:
            self._graphs[key] = self._capture(args, kwargs, training, lowering)
        return self._graphs[key]

    def lowering(self) -> Lowering:
        """What graphs lower on the device the model is on now (lowering.py)."""
        device = next(iter(self.base_model.parameters()), torch.empty(0)).device.type
        return self._kernel_choice.lowering(device)

    def lowers(self) -> bool:
        """Do graphs call the fused ops? "triton": yes; "torch": no; "auto": on a GPU with Triton (the
        fused kernels), and on the CPU for the sites whose fused op's torch path is faster (see lowering.py)."""
        return bool(self.lowering())

    def base_graph(self, *args, training: bool = False, **kwargs):
        """The base model's graph, without adapters, for this call signature."""
        kwargs = self.with_defaults(kwargs or dict(self.example_kwargs))
        return bind_program(self._export(args or self.example_args, kwargs, training), self.base_model)

    def _export(self, args, kwargs, training: bool):
        return exported(self.base_model, args, kwargs, training=training, hugging_face=self.hugging_face, name=self.name)

    def _capture(self, args, kwargs, training: bool, lowering: Lowering):
        routed = ROUTING_INPUT in kwargs
        kwargs = {k: v for k, v in kwargs.items() if k != ROUTING_INPUT}
        if routed and self.plan.trained:
            raise SurgeryError(
                "adapter_ids cannot route batches through adapters that train whole modules (train rules)",
                hint="route adapters made of apply rules only; set_active() switches the others",
            )
        if self.folded_in_place:  # the adapters are in the weights: the base graph, on the merged tensors
            return unadapted_graph(self._export(args, kwargs, training), self.base_model, self)
        planning = self.captured
        reuse = (
            not planning.opened.fake
            and autocast_state(self.base_model) is None  # the planning capture ran without autocast
            and planning.program is not None
            and training == planning.training
            and self.signature_key(args, kwargs) == self.signature_key(self.example_args, self.with_defaults(self.example_kwargs))
        )
        # The planning capture already traced this signature: reuse it once instead of exporting again.
        program = planning.program if reuse else self._export(args, kwargs, training)
        if reuse:
            planning.program = None
        return adapted_graph(program, self.base_model, self, insertions=self.insertions(),
                             gates=Gates(self.adapter_names, self.adapter_gates, routed), trained=tuple(self.plan.trained),
                             copies=self.trained, training=training, lowering=lowering, user_passes=self.user_passes,
                             lint=self.lint)

    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        # torch.compile traces neither this frame (recursive=False: this one only) nor _prepare (disabled), so the
        # graph for this call is captured here, outside Dynamo, and the forward Dynamo traces next finds it:
        # torch.export cannot run inside a trace.
        if not is_sharded(self):  # FSDP2 gathers the weights in its pre-forward hook: captured in forward then
            self._prepare(args, kwargs)
        return super().__call__(*args, **kwargs)

    @torch.compiler.disable
    def _prepare(self, args, kwargs) -> None:
        kwargs = self.with_defaults(dict(kwargs))
        if ROUTING_INPUT in kwargs:  # as forward will see it (a tensor); forward checks the ids
            kwargs[ROUTING_INPUT] = torch.as_tensor(kwargs[ROUTING_INPUT], device=self.adapter_gates.device)
        self.graph(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """Call the adapted model like the base model (the graph for this signature is captured on first use).

        ``adapter_ids`` (integers, one per batch row; -1 for none) runs each
        row with the adapter of that index in :attr:`adapter_names`.
        """
        kwargs = self.with_defaults(kwargs)
        if ROUTING_INPUT in kwargs:
            kwargs[ROUTING_INPUT] = checked_ids(kwargs[ROUTING_INPUT], self.adapter_names, self.adapter_gates.device, args, kwargs)
        graph = self.graph(*args, **kwargs)
        if is_sharded(self):  # FSDP2 gathered the parameters into new tensors: the graph reads those
            check_sharding(self)
            rebind(graph.meta[BINDINGS])
        return graph(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self.adapter_gates.dtype != torch.float32:  # .half() / .to(bf16) would round weights like 0.7
            self.adapter_gates = self.adapter_gates.float()
        self._graphs.clear()  # graphs hold constants of the old device or dtype: capture again
        if "_kernel_choice" in self.__dict__:
            self.lowering()  # the new device's, before any torch.compile traces a call
        return result

    def invalidate(self) -> None:
        """Forget every captured graph (after adapters were added, removed or replaced)."""
        self._graphs.clear()

    # --- folding (checked_fold.py, merged_model.py) -------------------------------------------

    @property
    def folded_in_place(self) -> bool:
        """Are the adapters folded into the base model's own weights (``fold(inplace=True)``, until ``unfold()``)?"""
        return self._in_place is not None

    def fold(self, *, adapters: dict | None = None, inplace: bool = False, verify: bool = True, args: tuple = (),
             kwargs: dict | None = None, quantized: str = "dequantize"):
        """The merged model (a :class:`Folded`): the adapters folded into their base weights, called like the base model.

        ``adapters`` (name -> weight) chooses which adapters fold and how strongly (default: the active
        ones, with their gates); the compiled model keeps its adapters. The fold is checked on
        ``args``/``kwargs`` (default: the example inputs) against the unfolded graph. ``inplace=True``
        writes the merged weights (and the trained copies of ``train`` modules) into the base model's own
        tensors, as PEFT's ``merge_and_unload``, and returns the base model; the compiled model then
        computes with the merged weights only, until :meth:`unfold` restores them bit for bit. Sites on
        bitsandbytes weights merge in full precision; ``quantized`` says what the folded graph holds there:
        "dequantize" (the merged weight in the compute dtype) or "requantize" (quantized again, which adds
        error; not verified), and ``fold_report`` then gives the max and mean absolute output difference.
        """
        refuse_sharded(self, "fold")
        check_quantized_merge(quantized)
        if self.folded_in_place:
            if inplace or adapters is not None:
                raise FoldError("the adapters are folded into the base weights already (fold(inplace=True))",
                                hint="unfold() first, then fold again")
            return Folded(self, self._in_place.weights, quantized, identity=True)
        weights = fold_weights(self.adapter_names, self.adapter_gates, adapters)
        self.fold_report = None
        args = args or self.example_args
        kwargs = self.with_defaults(dict(kwargs) if kwargs is not None else dict(self.example_kwargs))
        folded, self.fold_report = checked_fold(self, weights, verify=verify, inplace=inplace, gated=adapters is not None,
                                                args=args, kwargs=kwargs, quantized=quantized)
        if not inplace:
            return folded
        self.__dict__["_in_place"] = write_in_place(self.base_model, folded)
        self.invalidate()  # the graphs with adapter branches would add them to the merged weights again
        return self.base_model

    def unfold(self) -> None:
        """Undo ``fold(inplace=True)``: the base weights (and modules trained by ``train`` rules) come back bit for bit."""
        if self.folded_in_place:
            self._in_place.restore()
            self.__dict__["_in_place"] = None
            self.invalidate()

    def merged_state_dict(self, adapters: dict | None = None, quantized: str = "dequantize") -> dict:
        """The base model's state dict with the adapters folded in (new tensors; nothing changes in place):
        ``fold(adapters=adapters, quantized=quantized).state_dict()``, verified like every fold."""
        refuse_sharded(self, "merged_state_dict")
        return self.fold(adapters=adapters, quantized=quantized).state_dict()

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, adapter_ids=None, generator=None, on_tokens=None):
        """Prompt plus new tokens, as transformers' ``generate``, on adapted static-cache graphs (generation.py)."""
        return generation.generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, adapter_ids=adapter_ids, generator=generator,
                                   on_tokens=on_tokens)

    # --- generation, eager hooks and files ----------------------------------------------------------------

    def attach(self, model: nn.Module | None = None) -> list:
        """Make an eager model (default: the base model) run with these adapters (see surgeon/compiled/eager.py)."""
        return eager.attach(self, self.base_model if model is None else model)

    def save_adapter(self, directory, adapters=None) -> None:
        """Write adapters (default: every one) in PEFT's format (surgeon/checkpoints/peft.py)."""
        checkpointing.save_adapter(self, directory, adapters)

    def load_adapter(self, directory, name: str | None = None) -> str:
        """Load a PEFT-format adapter folder as adapter ``name`` (default: the folder's names); returns the name(s)."""
        return checkpointing.load_adapter(self, directory, name)

    def save_pretrained(self, directory, adapters: dict | None = None, quantized: str = "dequantize") -> None:
        """The folded model (``adapters``: name -> weight, default the active ones) as a Hugging Face checkpoint
        (``quantized``: see :meth:`fold`; "dequantize" writes no quantization_config): ``fold(...).save_pretrained``."""
        self.fold(adapters=adapters, quantized=quantized).save_pretrained(directory)

    def export(self, path, *, fold: bool = True, args: tuple = (), kwargs: dict | None = None, quantized: str = "dequantize") -> None:
        """The evaluation graph as a ``.pt2`` program (``fold``: merged, else with its adapters; see checkpointing.py)."""
        checkpointing.export_program(self, path, fold=fold, args=args, kwargs=kwargs, quantized=quantized)
