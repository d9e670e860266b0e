"""What every adapter method implements on a site (torch side; the configs stay torch-free).

A :class:`SiteAdapter` holds one method's parameters on one site and says
what the method does there, four ways:

- ``branch(graph, x, y)``: rewrite the captured graph at one call of the site.
  ``graph`` is a small builder (see passes/insert.py) with ``param(name)``,
  ``call(op, args, role)`` after the current output, ``call_before(...)`` before
  the base op, and ``training``. Return ``(new_input, new_output)``; either may
  be None (unchanged). The node that replaces the output must have role "out",
  and one that replaces the input role "in", each with the value it replaces
  as its first argument, so that folding can take the branch out again.
- ``fold(weight, bias, kind)``: the merged (weight, bias), computed in the dtype of the
  given weight (float32, or float64 for a float64 model), for the weight as stored
  (``hf_conv1d`` stores (in, out)).
- ``eager(module, x, y)``: the same computation in eager PyTorch (a forward
  hook, for ``generate()`` with a KV cache).
- ``peft_state()``: the tensors PEFT saves for this site, by key suffix.
- ``peft_type``, ``peft_config(sites)`` and ``rules_from_peft(config)``: the
  method in PEFT's adapter_config.json, both ways (see checkpoints/peft.py);
  ``peft_shared_state(modules)``: tensors saved once per adapter (VeRA's projections).

The constructor is called as ``cls(config, kind, in_features, out_features,
dtype=, device=, weight=, peers=)``: ``weight`` is the base weight, ``peers``
the plan sites of the same adapter and method. What the constructor would
refuse about a site, planning asks first: ``validate_site(site, context)``
returns :class:`SiteProblem` records, which ``surgeon plan`` reports at the
rule that chose the site (the constructor's own checks stay, for adapters
built without a plan).

A method ``NAME`` has its config in ``surgeon/methods/NAME.py`` (torch-free,
for the language) and its SiteAdapter in ``surgeon/methods/NAME_weights.py``,
registered with :func:`site_adapter`; the passes, the compiled model and the
checkpoint code find it with :func:`adapter_class`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

__all__ = ["SiteAdapter", "SiteProblem", "SiteContext", "site_adapter", "adapter_class", "peft_reader"]

_CLASSES: dict = {}


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

    @property
    def weight_values(self) -> bool:
        """Will compile see the weight's values? A fake tensor (planned without weights) stands for
        weights compile loads; a meta-device tensor has none."""
        return self.weight is not None and self.weight.device.type != "meta"


class SiteAdapter(nn.Module):
    method: str = ""
    peft_type: str = ""  # PEFT's peft_type for an adapter of this method alone
    peft_required: tuple = ()  # fields a PEFT config of that type must have
    replaces_weight: bool = False  # its branch swaps the weight the base op reads (one such adapter per tensor)
    unroutable: str | None = None  # why adapter_ids cannot route it per batch row; None: it can

    def __init__(self, config, kind: str, in_features: int, out_features: int):
        super().__init__()
        self.config = config
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def validate_site(cls, site, context: SiteContext) -> list:
        """The SiteProblems of adapting the plan site ``site`` (its ``config``, kind and shapes)."""
        return []

    def branch(self, graph, x, y):  # pragma: no cover - every method overrides it
        raise NotImplementedError

    def fold(self, weight, bias, kind: str):  # pragma: no cover
        raise NotImplementedError

    def eager(self, module, x, y):  # pragma: no cover
        raise NotImplementedError

    def peft_state(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def peft_config(cls, sites) -> dict:  # pragma: no cover
        """The method's fields of PEFT's adapter_config.json for these plan sites."""
        raise NotImplementedError

    def peft_saved_state(self) -> dict:
        """What :meth:`peft_state` writes to a file (a method may save a converted form)."""
        return self.peft_state()

    @classmethod
    def peft_saved_configs(cls, sites) -> list:
        """The config of each plan site as :meth:`peft_saved_state` writes it (surgeon's record of the rules).

        A method that saves a converted form (LoRA's PiSSA as rank 2r) gives the
        config that reloads that form; the others give each site's own.
        """
        return [site.config for site in sites]

    @classmethod
    def peft_shared_state(cls, modules: list) -> dict:
        """Tensors PEFT saves once per adapter rather than per site (full keys), for these site modules.

        Loading copies the saved tensors into these very tensors.
        """
        return {}

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:  # pragma: no cover
        """Rules (``ir.Rule`` objects, never text) targeting what a PEFT config of this ``peft_type`` targets.

        ``config`` has been type-checked (peft_fields.py); its values become typed
        values of the rules, so no config value can add a rule. Defined by one
        class per ``peft_type`` (LoRA reads DoRA's, which PEFT writes as LORA).
        """
        raise NotImplementedError

    def hook(self):
        """A forward hook running :meth:`eager` (``module.register_forward_hook(adapter.hook())``)."""

        def hook(module, args, output):
            return self.eager(module, args[0], output)

        return hook


def site_adapter(name: str):
    """Class decorator: the SiteAdapter implementation of method ``name``."""

    def register(cls):
        cls.method = name
        _CLASSES[name] = cls
        return cls

    return register


def adapter_class(name: str):
    """The SiteAdapter class of method ``name``, from ``surgeon/methods/<name>_weights.py``."""
    if name not in _CLASSES:
        importlib.import_module(f"surgeon.methods.{name}_weights")
    return _CLASSES[name]


def peft_reader(peft_type: str):
    """The SiteAdapter class that reads PEFT configs of ``peft_type``, or None."""
    from surgeon.methods._registry import method_names

    for name in method_names():
        cls = adapter_class(name)
        if cls.peft_type == peft_type and "rules_from_peft" in cls.__dict__:
            return cls
    return None
