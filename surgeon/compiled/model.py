"""Compiled: a model with its adapters inserted into captured graphs.

A :class:`Compiled` is an ``nn.Module``: optimizers, ``.to()``,
``state_dict()`` and training loops use it like the model it came from, and it
is called with the same keyword arguments, returning the same output class.

Inside, the adapter parameters (``adapters.<name>.<site>.lora_A`` ...) and the
trainable copies of ``train`` modules are the source of truth. Graphs are made
on demand, one per (training mode, call signature), by capturing the base model
with ``torch.export`` and running the pass pipeline on the result; every graph
references the very same parameters, so ``.train()`` and ``.eval()`` switch
between a graph with dropout and one without, and training either updates the
same weights. A graph is captured the first time a call needs it, in
``__call__`` before ``forward`` runs (outside a ``torch.compile`` trace, which
then finds it), and again after ``.to()`` or a change of adapters.

Base parameters are frozen (``requires_grad=False``), as PEFT does; their
values are never changed unless ``fold(inplace=True)`` is asked for, after
which the graphs are the base model's on the merged weights (surgeon/compiled/folding.py).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from surgeon.grammar import rules as ir
from surgeon.passes import Insertion, Pipeline, insert_adapters
from surgeon.passes.insert import ROUTING_INPUT, Gates
from surgeon.passes.lower import lower_adapters

from surgeon.compiled.distributed import bindings, check_sharding, is_sharded, rebind
from surgeon.capture.export import autocast_state, bind_program, export_program, widen_inputs
from surgeon.methods.adapter import SiteAdapter, adapter_class
from surgeon.planning.plan import Plan
from surgeon.kernels import check_kernels

from surgeon.compiled.folding import Folding
from surgeon.compiled.adapter_state import AdapterSwitching, gate_trained_modules, site_key

__all__ = ["Compiled"]




class Compiled(AdapterSwitching, Folding, nn.Module):
    """The adapted model. Build it with :func:`surgeon.compile`."""

    def __init__(self, captured, rule_set: ir.RuleSet, plan: Plan, *, passes: dict | None = None, lint: bool = True,
                 adapter_dtype: torch.dtype | None = None, kernels: str = "auto"):
        super().__init__()
        opened = captured.model
        self.base_model = opened.module
        self.adapters = nn.ModuleDict()
        self.trained = nn.ModuleDict()
        # Plain attributes (not submodules): graphs share the parameters above.
        self.__dict__["_graphs"] = {}
        self.__dict__["_inplace_originals"] = {}
        self.__dict__["_lowering_by_device"] = {}  # device type -> what kernels="auto" lowers there (see _lowering)
        self.fold_report: dict | None = None  # set by a fold of quantized sites (see fold)
        self.loftq_report: dict = {}  # site -> ||W - Q||, ||W - Q - s B A|| of LoftQ-started sites
        self.__dict__["captured"] = captured  # the planning capture: modules and sites
        self.adapter_dtype = adapter_dtype
        self.name = opened.name
        self.rules = rule_set
        self.plan = plan
        self.user_passes = dict(passes or {})
        self.lint = lint
        self.kernels = check_kernels(kernels)
        self.hugging_face = opened.is_hugging_face
        self.example_args, self.example_kwargs = opened.example_args, opened.example_kwargs
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        self.register_buffer("adapter_gates", torch.ones(0), persistent=False)
        self._build(plan, adapter_dtype)
        Pipeline.with_points({}, self.user_passes)  # refuse unknown pass points now, not at the first call
        self._lowering()  # decided before any torch.compile traces a call
        self._advertise_signature()

    def _advertise_signature(self) -> None:
        """Show the base model's forward signature (transformers' Trainer reads it to pick input columns)."""
        import inspect

        def forward(*args, **kwargs):
            return Compiled.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(self.base_model.forward)
        forward.__doc__ = Compiled.forward.__doc__
        self.__dict__["forward"] = forward

    # --- parameters ---------------------------------------------------------------------

    def _build(self, plan: Plan, adapter_dtype=None) -> None:
        """Create the parameters of every site and trained module of ``plan`` not made yet."""
        conv1d: dict = {}  # GPT-2 Conv1D paths of a quantized model, found once (LoftQ only)
        for site in plan.sites:
            if site.adapter in self.adapters and site_key(site.path) in self.adapters[site.adapter]:
                continue
            group = self.adapters[site.adapter] if site.adapter in self.adapters else nn.ModuleDict()
            group[site_key(site.path)] = self.site_module(site, plan, self.rules, adapter_dtype, conv1d=conv1d)
            self.adapters[site.adapter] = group
        for t in plan.trained:
            if site_key(t.path) in self.trained:
                continue  # one trainable copy per module (several adapters training it share it)
            module = copy.deepcopy(self.base_model.get_submodule(t.path))
            for p in module.parameters():
                p.requires_grad_(True)
            self.trained[site_key(t.path)] = module
        self._sync_gates()

    def site_module(self, site, plan: Plan, rules: ir.RuleSet, adapter_dtype=None, device=None, conv1d=None) -> SiteAdapter:
        """A new SiteAdapter for plan site ``site`` (``device="meta"``: its shapes only, nothing allocated or started)."""
        from surgeon.capture.sites import site_weight

        captured = self.captured.sites[site.path]
        weight = site_weight(self.base_model, captured)  # the parameter the site reads (MHA: in_proj_weight)
        dtype = adapter_dtype or (weight.dtype if weight.dtype == torch.float64 else torch.float32)
        device, conv1d = torch.device(device or weight.device), {} if conv1d is None else conv1d
        if captured.parts:  # MultiheadAttention: two projections in one site (surgeon/methods/mha_weights.py)
            from surgeon.methods.mha_weights import mha_adapter

            module = mha_adapter(site, captured, rules, dtype=dtype, device=device)
        else:
            # peers: the adapter's sites of the same method (VeRA shares its projections among them)
            peers = tuple(s for s in plan.sites if s.adapter == site.adapter and s.method == site.method)
            module = adapter_class(site.method)(site.config, site.kind, site.in_features, site.out_features, dtype=dtype,
                                                device=device, weight=weight if device == weight.device else weight.to(device), peers=peers)
        module.site_path, module.tied_with = site.path, tuple(site.tied_with)
        if getattr(site.config, "init", None) == "loftq" and device.type != "meta":
            if "paths" not in conv1d:
                from surgeon.passes.fold_quantized import conv1d_paths

                conv1d["paths"] = conv1d_paths(self.base_model)
            self._loftq(site, module, transposed=site.path in conv1d["paths"])
        return module

    def add_adapter(self, name: str, rules: ir.RuleSet) -> None:
        """Add (or replace) adapter ``name`` with the rules of ``rules`` (all its adapters' rules, merged).

        Planned and built aside first (surgeon/checkpoints/staging.py): an error leaves the model as it was."""
        from surgeon.checkpoints.staging import commit_adapter, stage_adapter

        commit_adapter(self, stage_adapter(self, name, rules))

    @property
    def adapter_names(self) -> tuple:
        """Every adapter, in the order declared in the rules, then loaded (``adapter_ids`` index this)."""
        return tuple(self.rules.adapter_names)

    @property
    def config(self):
        return getattr(self.base_model, "config", None)

    def adapter_module(self, adapter: str, path: str) -> SiteAdapter:
        """The parameters (and method) of adapter ``adapter`` on site ``path``."""
        return self.adapters[adapter][site_key(path)]

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

    # --- graphs -------------------------------------------------------------------------

    def _insertions(self) -> list:
        return [Insertion(s.path, s.kind, s.adapter, self.adapter_module(s.adapter, s.path)) for s in self.plan.sites]

    def _site_keys(self) -> tuple:
        """What a fold depends on besides tensors: every (adapter, site, kind, method) and trained module."""
        return tuple((s.adapter, s.path, s.kind, s.method) for s in self.plan.sites) + tuple((t.adapter, t.path) for t in self.plan.trained)

    def _key(self, args: tuple, kwargs: dict) -> tuple:
        def static(v):
            if isinstance(v, torch.Tensor):
                return ("tensor", v.dim(), v.dtype)
            return repr(v)

        return (self.training, tuple(static(a) for a in args), tuple(sorted((k, static(v)) for k, v in kwargs.items())))

    def _with_defaults(self, kwargs: dict) -> dict:
        # Hugging Face models return a KV cache unless told not to; a graph has none.
        if self.hugging_face and "use_cache" not in kwargs and "use_cache" in self.example_kwargs:
            kwargs = {**kwargs, "use_cache": False}
        return kwargs

    def graph(self, *args, training: bool | None = None, lowered: bool | None = None, **kwargs):
        """The adapted graph module for this call signature (captured on first use).

        ``lowered``: LoRA branches as fused kernel calls (default: as ``kernels`` decides).
        """
        kwargs = self._with_defaults(kwargs)
        training = self.training if training is None else training
        autocast = autocast_state(self.base_model)  # export keeps the dtypes it traced: a graph per autocast state
        if lowered is None:  # under autocast the plain aten ops (the fused ops take one dtype); else as kernels says
            lowered = False if autocast is not None else self._lowering()
        key = (training, lowered, autocast) + self._key(args, kwargs)[1:]  # a routed call (adapter_ids) has a graph of its own
        if key not in self._graphs:
            self._graphs[key] = self._capture(args, kwargs, training, lowered)
        return self._graphs[key]

    def lowers(self) -> bool:
        """Do graphs call the fused ops? "triton": yes; "torch": no; "auto": on a GPU with Triton (the
        fused kernels), and on the CPU for plain LoRA sites (see :meth:`_lowering`)."""
        return bool(self._lowering())

    def _lowering(self):
        """True (every eligible site), False, or "lora": with kernels="auto" on the CPU, plain LoRA sites of
        unrouted graphs only, the ones whose fused op's torch path beats the plain branch (it spares the
        adapter's passes over each output: kernels/lora_linear.py), unless Triton's interpreter is on.

        Decided once per device type and remembered: under torch.compile, Dynamo traces this call, and
        asking Triton about its driver there would break the graph."""
        if self.kernels != "auto":
            return self.kernels == "triton"
        device = next(iter(self.base_model.parameters()), torch.empty(0)).device.type
        if device not in self._lowering_by_device:
            self._lowering_by_device[device] = _auto_lowering(device)
        return self._lowering_by_device[device]

    def base_graph(self, *args, training: bool = False, **kwargs):
        """The base model's graph, without adapters, for this call signature."""
        kwargs = self._with_defaults(kwargs or dict(self.example_kwargs))
        return bind_program(self._export(args or self.example_args, kwargs, training), self.base_model)

    def _export(self, args, kwargs, training: bool):
        args, kwargs = widen_inputs(args, kwargs, self.hugging_face)
        model, was = self.base_model, self.base_model.training
        model.train(training)
        try:
            return export_program(model, args, kwargs, self.hugging_face, self.name)
        finally:
            model.train(was)

    def _capture(self, args, kwargs, training: bool, lowered: bool = False):
        routed = ROUTING_INPUT in kwargs
        kwargs = {k: v for k, v in kwargs.items() if k != ROUTING_INPUT}
        if routed and self.plan.trained:
            from surgeon.diagnostics import SurgeryError

            raise SurgeryError(
                "adapter_ids cannot route batches through adapters that train whole modules (train rules)",
                hint="route adapters made of apply rules only; set_active() switches the others",
            )
        if self.folded_in_place:  # the adapters are in the weights: the base graph, on the merged tensors
            gm = bind_program(self._export(args, kwargs, training), self.base_model)
            gm.meta["surgeon_bindings"] = bindings(self, gm)
            return gm
        planning = self.captured
        reuse = (
            not planning.model.fake
            and autocast_state(self.base_model) is None  # the planning capture ran without autocast
            and planning.program is not None
            and training == planning.training
            and self._key(args, kwargs)[1:] == self._key(self.example_args, self._with_defaults(self.example_kwargs))[1:]
        )
        # The planning capture already traced this signature: reuse it once instead of exporting again.
        program = planning.program if reuse else self._export(args, kwargs, training)
        if reuse:
            planning.program = None
        gm = bind_program(program, self.base_model)
        for key, module in self.trained.items():  # the graph trains the copies, not the user's module
            path = key.replace("__", ".")
            for name, param in module.named_parameters():
                owner_path, _, leaf = f"{path}.{name}".rpartition(".")
                setattr(gm.get_submodule(owner_path), leaf, param)
        gates = Gates(self.adapter_names, self.adapter_gates, routed)
        insert = insert_adapters(self._insertions(), training=training, gates=gates)
        core = {"insert": [insert, gate_trained_modules(self)]}
        if lowered and not (routed and lowered == "lora"):
            core["lower"] = [lower_adapters(routed=routed, dora=lowered is True)]
        pipeline = Pipeline.with_points(core, self.user_passes)
        gm = pipeline.run(gm, lint=self.lint).graph_module
        gm.meta["surgeon_bindings"] = bindings(self, gm)  # which module owns each tensor (FSDP2 swaps them)
        return gm

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
        kwargs = self._with_defaults(dict(kwargs))
        if ROUTING_INPUT in kwargs:  # as forward will see it (a tensor); forward checks the ids
            kwargs[ROUTING_INPUT] = torch.as_tensor(kwargs[ROUTING_INPUT], device=self.adapter_gates.device)
        self.graph(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """Call the adapted model like the base model (the graph for this signature is captured on first use).

        ``adapter_ids`` (integers, one per batch row; -1 for none) runs each
        row with the adapter of that index in :attr:`adapter_names`.
        """
        kwargs = self._with_defaults(kwargs)
        if ROUTING_INPUT in kwargs:
            kwargs[ROUTING_INPUT] = self._checked_ids(kwargs[ROUTING_INPUT], args, kwargs)
        graph = self.graph(*args, **kwargs)
        if is_sharded(self):  # FSDP2 gathered the parameters into new tensors: the graph reads those
            check_sharding(self)
            rebind(graph.meta["surgeon_bindings"])
        return graph(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self.adapter_gates.dtype != torch.float32:  # .half() / .to(bf16) would round weights like 0.7
            self.adapter_gates = self.adapter_gates.float()
        self._graphs.clear()  # graphs hold constants of the old device or dtype: capture again
        if "_lowering_by_device" in self.__dict__:
            self._lowering()  # the new device's, before any torch.compile traces a call
        return result

    def invalidate(self) -> None:
        """Forget every captured graph (after adapters were added, removed or replaced)."""
        self._graphs.clear()

    def _loftq(self, site, module, transposed: bool) -> None:
        """LoftQ's start for a LoRA site on a quantized weight (surgeon/methods/loftq.py); ``transposed``: the full-precision
        weight is stored (in, out) (GPT-2's Conv1D, which bitsandbytes quantized as (out, in))."""
        from surgeon.diagnostics import PlanError

        from surgeon.methods.loftq import loftq_start

        source = self.captured.model.full_precision
        if source is None:
            raise PlanError(f"lora(init=\"loftq\") on {site.path} needs the model's unquantized weights",
                            hint="surgeon.compile(model, rules, full_precision=<the unquantized model, state dict or folder>)")
        weight = source(f"{site.path}.weight")
        weight = weight.T if transposed else weight
        self.loftq_report[site.path] = loftq_start(module, self.base_model.get_submodule(site.path), weight, site.config.loftq_iter)

    # --- hooks for eager use ---------------------------------------------------------------

    def attach(self, model: nn.Module | None = None) -> list:
        """Make an eager model (default: the base model) run with these adapters (see surgeon/compiled/eager.py)."""
        from surgeon.compiled.eager import attach

        return attach(self, self.base_model if model is None else model)

    # --- checkpoints ---------------------------------------------------------------------

    def save_adapter(self, directory, adapters=None) -> None:
        from surgeon.checkpoints.peft import save_adapter

        save_adapter(self, directory, adapters)

    def load_adapter(self, directory, name: str | None = None) -> str:
        from surgeon.checkpoints.peft import load_adapter

        return load_adapter(self, directory, name)

    def save_pretrained(self, directory, adapters: dict | None = None, quantized: str = "dequantize") -> None:
        """The folded model (``adapters``: name -> weight, default the active ones) as a Hugging Face checkpoint
        (``quantized``: see :meth:`fold`; "dequantize" writes no quantization_config): ``fold(...).save_pretrained``."""
        self.fold(adapters=adapters, quantized=quantized).save_pretrained(directory)

    def export(self, path, *, fold: bool = True, args: tuple = (), kwargs: dict | None = None, quantized: str = "dequantize") -> None:
        from surgeon.checkpoints.program import export_program_file

        export_program_file(self, path, fold=fold, args=args, kwargs=kwargs, quantized=quantized)


def _auto_lowering(device: str):
    if device == "cpu":
        return "lora" if not _interpreting() else False
    from surgeon.kernels import triton_mode

    return device == "cuda" and triton_mode() == "gpu"


def _interpreting() -> bool:
    """Is Triton's interpreter on (which would run the fused kernels on the CPU)? Asked without importing Triton."""
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" in sys.modules:
        from surgeon.kernels import triton_mode

        return triton_mode() == "interpret"
    return False
