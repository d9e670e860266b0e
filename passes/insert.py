"""The insert pass: put every adapter's branch into the graph at its site.

For each site (a module path computing ``aten.linear`` or GPT-2's
``aten.addmm``), the adapter's method rewrites the graph through a
:class:`GraphBuilder` (see surgeon/methods/adapter.py); for LoRA::

    h = linear(dropout(x), A)        # (..., r)     A: (r, in)
    d = linear(h, B[, b_B])          # (..., out)   B: (out, r)
    y' = y + scale * d               # scale = alpha / r, or alpha / sqrt(r) with rslora

Several adapters on one site apply in order, each wrapping the output of the
one before. The adapter's parameters are registered on the graph module at
the site's path (``<path>.surgeon_<adapter>__<name>``): the very Parameter
objects the compiled model owns, so every graph of one compiled model trains
the same weights. Inserted nodes carry ``meta["surgeon"] = {adapter, site,
method, role}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._graph import Inserter, site_args, site_nodes
from .pipeline import PassResult

__all__ = ["Insertion", "insert_adapters", "attribute_prefix", "GraphBuilder"]


@dataclass(frozen=True)
class Insertion:
    """One adapter on one site, as the passes need it."""

    path: str
    kind: str  # "linear" | "hf_conv1d"
    adapter: str
    module: object  # a surgeon.methods.adapter.SiteAdapter


def attribute_prefix(adapter: str) -> str:
    """``surgeon_<adapter>__``, with characters that cannot be in an attribute name spelled out."""
    return "surgeon_" + re.sub(r"\W", lambda m: f"_{ord(m.group()):x}_", adapter) + "__"


def outermost(node):
    """The last node of the chain of adapter outputs wrapping ``node`` (``node`` itself if none)."""
    current = node
    while True:
        wrapper = next(
            (u for u in current.users if u.meta.get("surgeon", {}).get("role") == "out" and u.args[0] is current), None
        )
        if wrapper is None:
            return current
        current = wrapper


class GraphBuilder:
    """What a method's ``branch`` uses to rewrite one call of its site."""

    def __init__(self, gm, node, spec: Insertion, training: bool):
        import torch

        self.gm, self.node, self.spec, self.training = gm, node, spec, training
        self.aten = torch.ops.aten
        self.prefix = attribute_prefix(spec.adapter)
        self.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        self.meta["surgeon"] = {"adapter": spec.adapter, "site": spec.path, "method": spec.module.method}
        self.after = Inserter(gm.graph, outermost(node), self.meta)
        self._params: dict = {}

    @property
    def base(self):
        """The base op node (``aten.linear`` / ``aten.addmm``)."""
        return self.node

    def weight(self):
        """The get_attr node of the base weight."""
        return site_args(self.node, self.spec.kind)[1]

    def bias(self):
        """The get_attr node of the base bias, or None."""
        return site_args(self.node, self.spec.kind)[2]

    def replace_weight(self, node, *, tied: bool = False) -> None:
        """Make the base op read ``node`` (role "weight") instead of its weight.

        With ``tied``, every other op of the graph reading the same tensor (a
        tied output layer) reads ``node`` too.
        """
        weight = self.weight()
        readers = [self.node]
        if tied:
            tensor = _attr(self.gm, weight.target)
            for other in self.gm.graph.nodes:
                if other.op == "get_attr" and _attr(self.gm, other.target) is tensor:
                    readers += [(u, other) for u in other.users if u is not node and "surgeon" not in u.meta]
        for reader in readers:
            user, old = reader if isinstance(reader, tuple) else (reader, weight)
            user.replace_input_with(old, node)

    def param(self, name: str):
        """A get_attr node for the adapter's parameter ``name`` (placed before the base op)."""
        if name not in self._params:
            with self.gm.graph.inserting_before(self.node):
                attr = self.gm.graph.get_attr(f"{self.spec.path}.{self.prefix}{name}")
            attr.meta.update(self.meta)
            attr.meta["surgeon"] = {**self.meta["surgeon"], "role": f"param:{name}"}
            self._params[name] = attr
        return self._params[name]

    def call(self, op, args: tuple, role: str, kwargs: dict | None = None):
        """Insert ``op(*args)`` after the site's current output."""
        return self.after.call(op, args, role, kwargs)

    def call_before(self, op, args: tuple, role: str, kwargs: dict | None = None):
        """Insert ``op(*args)`` right before the base op (for input-side rewrites)."""
        with self.gm.graph.inserting_before(self.node):
            node = self.gm.graph.call_function(op, args, kwargs or {})
        node.meta.update({k: v for k, v in self.meta.items() if k != "surgeon"})
        node.meta["surgeon"] = {**self.meta["surgeon"], "role": role}
        return node

    @staticmethod
    def dtype_of(node):
        value = node.meta.get("val") if hasattr(node, "meta") else None
        return None if value is None else value.dtype

    def cast(self, node, dtype, source=None):
        """``node`` converted to ``dtype`` (no node added when it already is).

        ``source`` is the node's dtype when the graph does not record it (nodes a branch added).
        """
        if not self._needs_cast(node, dtype, source):
            return node
        return self.call(self.aten._to_copy.default, (node,), "cast", {"dtype": dtype})

    def cast_before(self, node, dtype):
        """:meth:`cast`, placed before the base op."""
        if not self._needs_cast(node, dtype):
            return node
        return self.call_before(self.aten._to_copy.default, (node,), "cast", {"dtype": dtype})

    def _needs_cast(self, node, dtype, source=None) -> bool:
        current = self.dtype_of(node) or source
        if node.op == "get_attr" and current is None:  # an adapter parameter: its dtype is known
            current = _attr(self.gm, node.target).dtype
        return dtype is not None and current is not None and current != dtype


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def insert_adapters(insertions, *, training: bool):
    """A pass that inserts every adapter branch of ``insertions`` into a graph module."""

    def insert_adapter_branches(gm) -> PassResult:
        changed = False
        for spec in insertions:
            nodes = site_nodes(gm, spec.path, spec.kind)
            if not nodes:
                raise ValueError(f"no {spec.kind} node computes site '{spec.path}' in this graph")
            owner = gm.get_submodule(spec.path)
            prefix = attribute_prefix(spec.adapter)
            for name, param in spec.module.named_parameters(recurse=False):
                owner.register_parameter(prefix + name, param)
            for name, buffer in spec.module.named_buffers(recurse=False):
                owner.register_buffer(prefix + name, buffer)
            for node in nodes:
                builder = GraphBuilder(gm, node, spec, training)
                x = site_args(node, spec.kind)[0]
                current = outermost(node)
                users = [u for u in current.users]
                new_x, new_y = spec.module.branch(builder, x, current)
                if new_x is not None:
                    node.replace_input_with(x, new_x)
                if new_y is not None:
                    for user in users:
                        user.replace_input_with(current, new_y)
                changed = True
        return PassResult(gm, changed)

    return insert_adapter_branches
