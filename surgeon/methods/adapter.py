"""What every adapter method implements on a site (torch side; the configs stay torch-free).

A :class:`SiteAdapter` holds one method's parameters on one site and says
what the method does there:

- ``branch(graph, x, y)``: rewrite the captured graph at one call of the site.
  ``graph`` is a small builder (see passes/insert.py) with ``param(name)``,
  ``call(op, args, role)`` after the current output, ``call_before(...)`` before
  the base op, and ``training``. Return ``(new_input, new_output)``; either may
  be None (unchanged). The node that replaces the output must have role
  ``node_roles.OUT``, and one that replaces the input ``node_roles.IN``, each with
  the value it replaces as its first argument, so that folding can take the
  branch out again (surgeon/methods/node_roles.py names every role).
- ``fold(weight, bias, kind)``: the merged (weight, bias), computed in the dtype of the
  given weight (float32, or float64 for a float64 model), for the weight as stored
  (``hf_conv1d`` stores (in, out)).
- ``eager(module, x, y)``: the same computation in eager PyTorch (a forward
  hook, for ``generate()`` with a KV cache); ``hook()`` makes the hook.
- ``peft_state()``: the tensors PEFT saves for this site, by key suffix;
  ``peft_saved_state()`` what is written (a method may save a converted form);
  ``peft_shared_state(modules)``: tensors saved once per adapter (VeRA's projections).
  The config side of PEFT's format, both ways, is the method's :class:`PeftFormat`
  (``peft_format``; surgeon/methods/peft_format.py).

The constructor is called as ``cls(config, kind, in_features, out_features,
dtype=, device=, weight=, peers=)``: ``weight`` is the base weight, ``peers``
the plan sites of the same adapter and method (:meth:`for_site` builds one for
a plan site). What the constructor would refuse about a site, planning asks
first: ``validate_site(site, context)`` returns :class:`SiteProblem` records,
which ``surgeon plan`` reports at the rule that chose the site (the
constructor's own checks stay, for adapters built without a plan).

What the rest of surgeon asks of a site's adapter, besides (defaults here):

- ``low_rank_factors() -> (A, B, s) | None``: the live parameters A (r, in) and
  B (out, r) and the scale s when the site's update is exactly ``dW = s B A``
  (what merging and hot swaps take); None otherwise, and then
  ``low_rank_refusal()`` says why in words ("dora on model.q (linear)"), a
  phrase callers complete with what they needed it for; it is None when the
  factors exist. ``load_low_rank_factors(A, B)`` copies new factors in (same shapes).
- ``adapts_quantized``: the method adapts a bitsandbytes-quantized linear (its
  branch reads only the site's input and output; it folds dequantized);
  ``quantized_limits()`` and ``quantized_usage()`` say with what, for hints.
- ``starts_from_full_precision`` and ``start_from_full_precision(module, weight)``:
  an adapter started from the unquantized weight of a quantized site (LoftQ).
- ``replaces_weight``, ``follows_ties``, ``applies_gate``, ``unroutable``: below.

A method ``NAME`` is the folder ``surgeon/methods/NAME/``: its torch-free
config registers it (surgeon/methods/_registry.py) with the paths of its
SiteAdapter, PEFT format and lowering patterns; :func:`adapter_class` finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgeon.diagnostics import SurgeryError

from surgeon.methods._registry import adapter_class, method_for, peft_reader

__all__ = ["SiteAdapter", "SiteProblem", "SiteContext", "adapter_class", "peft_reader", "build_site_adapter"]


@dataclass(frozen=True)
class SiteProblem:
    """Why a method cannot adapt one planned site (planning locates it at the rule)."""

    code: str
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class SiteContext:
    """What planning knows of a site besides its plan entry."""

    peers: tuple = ()  # the plan's sites of the same adapter and method (the constructor's ``peers``)
    weight: object = None  # the base weight as the captured model holds it
    model: str = ""  # the model's name, for messages
    full_precision: bool = False  # were the model's unquantized weights given (compile(full_precision=...))?
    quantized_methods: str = ""  # how the methods that adapt a quantized linear are used there, for hints

    @property
    def weight_values(self) -> bool:
        """Will compile see the weight's values? A fake tensor (planned without weights) stands for
        weights compile loads; a meta-device tensor has none."""
        return self.weight is not None and self.weight.device.type != "meta"


class SiteAdapter(nn.Module):
    method: str = ""  # the method's name (its config's ``method_name``)
    peft_format = None  # its PeftFormat class (surgeon/methods/peft_format.py), None: PEFT has no such method
    replaces_weight: bool = False  # its branch swaps the weight the base op reads (one such adapter per tensor)
    replaces_weight_hint: str = ""  # how to give one adapter all of what two would have replaced, for hints
    follows_ties: bool = False  # tied readers of the site's weight (a tied lm_head) see its change too
    applies_gate: bool = False  # its branch multiplies its change by the gate itself (else the insert pass interpolates)
    unroutable: str | None = None  # why adapter_ids cannot route it per batch row; None: it can
    adapts_quantized: bool = False  # it adapts a bitsandbytes-quantized linear
    starts_from_full_precision: bool = False  # it starts from the unquantized weight of a quantized site

    def __init__(self, config, kind: str, in_features: int, out_features: int):
        super().__init__()
        self.config = config
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # PEFT's peft_type for the method, read off its format (for callers that ask the adapter class).
        cls.peft_type = cls.peft_format.peft_type if cls.peft_format is not None else ""

    @classmethod
    def for_site(cls, site, captured_site=None, rules=None, *, dtype, device, weight=None, peers=()) -> "SiteAdapter":
        """A new adapter for plan site ``site`` (``captured_site``: its capture Site; ``rules``: the rule set,
        to locate a refusal at the rule)."""
        return cls(site.config, site.kind, site.in_features, site.out_features, dtype=dtype, device=device,
                   weight=weight, peers=peers)

    @classmethod
    def validate_site(cls, site, context: SiteContext) -> list:
        """The SiteProblems of adapting the plan site ``site`` (its ``config``, kind and shapes)."""
        return []

    @classmethod
    def quantized_limits(cls) -> str:
        """What it takes on a quantized linear, in words ("init kaiming, ..."; "" for nothing more)."""
        return ""

    @classmethod
    def quantized_usage(cls) -> str:
        """How the method adapts quantized linears, for hints ("lora (init kaiming, ...)")."""
        limits = cls.quantized_limits()
        return f"{cls.method} ({limits})" if limits else cls.method

    def branch(self, graph, x, y):  # pragma: no cover - every method overrides it
        raise NotImplementedError

    def fold(self, weight, bias, kind: str):  # pragma: no cover
        raise NotImplementedError

    def eager(self, module, x, y):  # pragma: no cover
        raise NotImplementedError

    def peft_state(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def peft_saved_state(self) -> dict:
        """What :meth:`peft_state` writes to a file (a method may save a converted form)."""
        return self.peft_state()

    @classmethod
    def peft_shared_state(cls, modules: list) -> dict:
        """Tensors PEFT saves once per adapter rather than per site (full keys), for these site modules.

        Loading copies the saved tensors into these very tensors.
        """
        return {}

    def low_rank_factors(self):
        """(A (r, in), B (out, r), s) when this site's update is exactly s B A, else None."""
        return None

    def low_rank_refusal(self) -> str | None:
        """Why :meth:`low_rank_factors` is None, in words; None when it is not."""
        return f"{self.method} on {self.where()} ({self.kind})"

    def load_low_rank_factors(self, a, b) -> None:
        """Copy new factors A (r, in) and B (out, r) into the site's own (same shapes)."""
        raise SurgeryError(f"cannot load low-rank factors into {self.low_rank_refusal()}: its update is not one product s B A")

    def start_from_full_precision(self, module, weight) -> dict:  # pragma: no cover - only such methods call it
        """Start from ``weight``, the unquantized weight (out, in) of the quantized ``module``; returns a report."""
        raise NotImplementedError

    def where(self) -> str:
        """The site's path, once the compiled model has set it (``site_path``)."""
        return getattr(self, "site_path", None) or "its site"

    def hook(self):
        """A forward hook running :meth:`eager` (``module.register_forward_hook(adapter.hook())``)."""

        def hook(module, args, output):
            return self.eager(module, args[0], output)

        return hook


def build_site_adapter(site, captured_site, rules=None, *, dtype, device, weight=None, peers=()) -> SiteAdapter:
    """The SiteAdapter of plan site ``site`` (``captured_site``: its capture Site): the method's own class, or
    its class for a site of several weights (``captured_site.parts``: a MultiheadAttention)."""
    method = method_for(site.method)
    parts = getattr(captured_site, "parts", ())
    cls = method.multi_weight_class() if parts else method.adapter_class()
    if cls is None:
        raise SurgeryError(f"{site.method} cannot adapt {site.path}" + (" (a site of several weights)" if parts else ""))
    return cls.for_site(site, captured_site, rules, dtype=dtype, device=device, weight=weight, peers=peers)
