"""The one registry of adapter methods: one :class:`Method` record per method, keyed by its config class.

A method is one folder of ``surgeon/methods/`` (``lora/``, ``dora/``, ...). Its torch-free config module
registers the config dataclass (fields declared with ``surgeon.grammar.signature.param``) under its language
name, and says where the rest of the method lives, as ``"module:name"`` paths relative to the folder::

    @register_method("lora", sites=("linear", ...), adapter=".site:LoraWeights", peft=".peft:LoraPeft",
                     lowering=".lowering:PATTERNS", multi_weight=".mha:MhaLoraWeights")
    @dataclass(frozen=True)
    class LoraConfig: ...

The language's checker, planning, the passes, merging, swapping and the checkpoint code all read these
records; nothing else says what methods exist. The torch side (SiteAdapter classes, lowering patterns) is
imported on first use, by name, so that the language reads the registry without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterable

from surgeon.grammar.rules import Argument, MethodCall
from surgeon.grammar.signature import MethodSignature, register_signature, signature_of

__all__ = [
    "SITE_KINDS",
    "Method",
    "register_method",
    "method_for",
    "registered_methods",
    "get_method",
    "method_names",
    "signatures",
    "adapter_class",
    "peft_format_of",
    "peft_reader",
    "peft_formats",
    "lowering_patterns",
    "low_rank_method",
    "low_rank_call",
]

# The kinds of site a method can adapt (capture classifies graph nodes into these):
# linear (aten.linear), hf_conv1d (transformers' GPT-2 Conv1D: aten.addmm on an
# (in, out) weight), embedding (aten.embedding), conv1d/conv2d/conv3d (aten.convNd).
SITE_KINDS = ("linear", "hf_conv1d", "embedding", "conv1d", "conv2d", "conv3d")


@dataclass(frozen=True)
class Method:
    """One adapter method: what the rest of surgeon asks of it, or where to find it.

    ``adapter``, ``multi_weight``, ``peft`` and ``lowering`` are ``"module:name"`` paths (a module path
    starting with "." is relative to the config's package), None where the method has no such part.
    """

    name: str
    config_class: type
    signature: MethodSignature
    adapter: str | None = None  # its SiteAdapter (torch): parameters, graph branch, fold, eager hook
    multi_weight: str | None = None  # its SiteAdapter for a site of several weights (MultiheadAttention), None: it cannot adapt one
    peft: str | None = None  # its PEFT format (torch-free, surgeon/methods/peft_format.py), None: PEFT has no such method
    lowering: str | None = None  # its lowering patterns (a tuple of passes.lower.LoweringPattern), None: none

    @property
    def sites(self) -> tuple:
        """The site kinds it adapts (of SITE_KINDS)."""
        return self.signature.sites

    @property
    def summary(self) -> str:
        """The first line of its config's docstring."""
        return (self.config_class.__doc__ or "").strip().splitlines()[0] if self.config_class.__doc__ else ""

    @property
    def low_rank(self) -> bool:
        """Can its sites hold a plain low-rank product s B A (what a weighted merge makes)? Its config then
        says how to write one: ``low_rank_arguments(rank)``."""
        return callable(getattr(self.config_class, "low_rank_arguments", None))

    def adapter_class(self):
        """Its SiteAdapter class, or None for a method registered without one (it can be planned, not built)."""
        return self._load(self.adapter)

    def multi_weight_class(self):
        """Its SiteAdapter class for a site of several weights, or None."""
        return self._load(self.multi_weight)

    def peft_format(self):
        """Its PEFT format class (``peft_type``, ``peft_config``, ``rules_from_peft``), or None."""
        return self._load(self.peft)

    def lowering_patterns(self) -> tuple:
        """The lowering patterns it contributes (passes/lower.py applies them)."""
        return tuple(self._load(self.lowering) or ())

    def low_rank_call(self, rank: int) -> MethodCall:
        """The call giving a site a plain low-rank product of rank ``rank`` at scale 1 (a merge's result)."""
        arguments = self.config_class.low_rank_arguments(rank)
        return MethodCall(self.name, tuple(Argument(name, value) for name, value in arguments.items()))

    def _load(self, where: str | None):
        if where is None:
            return None
        module, _, name = where.partition(":")
        package = self.config_class.__module__.rpartition(".")[0]
        # By name, on first use: the torch side stays unimported while the language reads the registry.
        return getattr(importlib.import_module(module, package=package), name)


_BY_NAME: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}


def register_method(name: str, *, sites: Iterable[str], adapter: str | None = None, multi_weight: str | None = None,
                    peft: str | None = None, lowering: str | None = None) -> Callable[[type], type]:
    """Class decorator: register a config dataclass as the method ``name`` (see :class:`Method` for the rest)."""
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITE_KINDS]
    if unknown:
        raise ValueError(f"unknown site kinds {unknown}; known: {SITE_KINDS}")

    absolute = [p for p in (adapter, multi_weight, peft, lowering) if p is not None and not p.startswith(".")]
    if absolute:  # a method's parts live in its folder; an absolute name could point up a floor unseen
        raise ValueError(f"method {name!r}: {absolute[0]!r} must be a path relative to the method's folder (\".site:X\")")

    def decorate(config_class: type) -> type:
        if name in _BY_NAME:
            raise ValueError(f"method {name!r} is already registered")
        method = Method(name, config_class, signature_of(name, config_class, sites), adapter, multi_weight, peft, lowering)
        _BY_NAME[name] = _BY_CONFIG[config_class] = method
        register_signature(method.signature)  # the language's checker reads it there
        config_class.method_name = name
        return config_class

    return decorate


def method_for(key) -> Method:
    """The record of a method, by its name, its config class or a config object (KeyError if unknown)."""
    if isinstance(key, str):
        return _BY_NAME[key]
    return _BY_CONFIG[key if isinstance(key, type) else type(key)]


def registered_methods() -> tuple:
    """Every method's record, by name."""
    return tuple(_BY_NAME[name] for name in sorted(_BY_NAME))


def get_method(name: str) -> MethodSignature:
    """The language's signature of method ``name`` (its record: :func:`method_for`)."""
    return _BY_NAME[name].signature


def method_names() -> list[str]:
    return sorted(_BY_NAME)


def signatures() -> dict[str, MethodSignature]:
    """A snapshot of the registry: method name -> signature."""
    return {name: method.signature for name, method in _BY_NAME.items()}


def adapter_class(name: str):
    """The SiteAdapter class of method ``name``."""
    found = _BY_NAME[name].adapter_class()
    if found is None:
        raise LookupError(f"method {name!r} is registered without a SiteAdapter: it can be planned, not built")
    return found


def peft_format_of(name: str):
    """The PEFT format class of method ``name``, or None (not ``peft_format``: that is the module of shared PEFT code)."""
    return _BY_NAME[name].peft_format()


def peft_formats(peft_type: str) -> list:
    """The PEFT format classes of ``peft_type`` (several methods may share one: DoRA's is LoRA's)."""
    found = (method.peft_format() for method in registered_methods())
    return [f for f in found if f is not None and f.peft_type == peft_type]


def peft_reader(peft_type: str):
    """The PEFT format class that reads PEFT configs of ``peft_type`` into rules (``rules_from_peft``), or None."""
    return next((f for f in peft_formats(peft_type) if f.reads), None)


def lowering_patterns() -> tuple:
    """Every method's lowering patterns, methods by name."""
    return tuple(pattern for method in registered_methods() for pattern in method.lowering_patterns())


def _low_rank() -> Method:
    found = [method for method in registered_methods() if method.low_rank]
    if len(found) != 1:
        raise LookupError(f"one method should declare low_rank_arguments, not {len(found)}")
    return found[0]


def low_rank_method() -> str:
    """The method whose sites hold a plain low-rank product s B A: what a weighted merge produces."""
    return _low_rank().name


def low_rank_call(rank: int) -> MethodCall:
    """That method's call for a site of rank ``rank`` at scale 1 (r = alpha = rank)."""
    return _low_rank().low_rank_call(rank)
