"""The one registry of adapter methods.

A method is a frozen config dataclass (fields declared with
``surgeon.grammar.signature.param``) registered under its language name with
:func:`register_method`. The language's checker, and later the passes and the
checkpoint code, all look methods up here: adding a method touches one module.
"""

from __future__ import annotations

from typing import Callable, Iterable

from surgeon.grammar.signature import MethodSignature, register_signature, signature_of

__all__ = ["SITE_KINDS", "register_method", "get_method", "method_names", "signatures"]

# The kinds of site a method can adapt (capture classifies graph nodes into these):
# linear (aten.linear), hf_conv1d (transformers' GPT-2 Conv1D: aten.addmm on an
# (in, out) weight), embedding (aten.embedding), conv1d/conv2d/conv3d (aten.convNd).
SITE_KINDS = ("linear", "hf_conv1d", "embedding", "conv1d", "conv2d", "conv3d")

_METHODS: dict[str, MethodSignature] = {}


def register_method(name: str, *, sites: Iterable[str]) -> Callable[[type], type]:
    """Class decorator: register a config dataclass as the method ``name``."""
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITE_KINDS]
    if unknown:
        raise ValueError(f"unknown site kinds {unknown}; known: {SITE_KINDS}")

    def decorate(config_class: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = signature_of(name, config_class, sites)
        register_signature(_METHODS[name])  # the language's checker reads it there
        config_class.method_name = name
        return config_class

    return decorate


def get_method(name: str) -> MethodSignature:
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


def signatures() -> dict[str, MethodSignature]:
    """A snapshot of the registry: method name -> signature."""
    return dict(_METHODS)
