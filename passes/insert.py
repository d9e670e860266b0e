"""The insert pass: put every adapter's branch into the graph at its site.

For each site (a module path computing ``aten.linear`` or GPT-2's
``aten.addmm``), the adapter's method rewrites the graph through a
:class:`GraphBuilder` (see surgeon/methods/adapter.py); a low-rank update, for example::

    h = linear(dropout(x), A)        # (..., r)     A: (r, in)
    d = linear(h, B[, b_B])          # (..., out)   B: (out, r)
    y' = y + scale * d               # scale = alpha / r, or alpha / sqrt(r) with rslora

Several adapters on one site apply in order, each wrapping the output of the
one before.

Gates: with ``gates`` (a :class:`Gates`), how much each adapter acts is read
from tensors, not decided in Python, so switching adapters never needs a new
graph: either one float per adapter (the ``surgeon_gates`` buffer: 1 active,
0 inactive, set by ``Compiled.set_active``), or, for a routed graph, one per
batch row, ``adapter_ids == i`` from an ``adapter_ids`` input the pass adds
(-1: no adapter). A method whose SiteAdapter sets ``applies_gate`` multiplies
its change by ``graph.gate()`` itself (a low-rank update: into its scale, no extra pass over
the output); for the others the pass interpolates, ``y + g (y' - y)`` (and
``x + g (x' - x)`` for input-side methods), which is the method at g = 1, the
base at g = 0, and linear in between, as folding with a weight is. The adapter's parameters are registered on the graph module at
the site's path (``<path>.surgeon_<adapter>__<name>``): the very Parameter
objects the compiled model owns, so every graph of one compiled model trains
the same weights. Inserted nodes carry ``meta["surgeon"] = {adapter, site,
method, role}`` (the roles: surgeon/methods/node_roles.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from surgeon.diagnostics import PlanError

from surgeon.methods import node_roles as roles
from surgeon.methods.node_roles import GATES_BUFFER, ROUTING_INPUT
from surgeon.passes._graph import Inserter, SiteNodes, attribute, site_args
from surgeon.passes.pipeline import PassResult

__all__ = ["Insertion", "Gates", "insert_adapters", "attribute_prefix", "GraphBuilder", "GATES_BUFFER", "ROUTING_INPUT"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Gates:
    """Where adapters read how much they act: ``tensor[i]`` for ``names[i]``, or per batch row when ``routed``."""

    names: tuple
    tensor: object = None  # float32 (len(names),), shared with the compiled model
    routed: bool = False


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
        wrapper = next((u for u in current.users if roles.role_of(u) == roles.OUT and u.args[0] is current), None)
        if wrapper is None:
            return current
        current = wrapper


class GraphBuilder:
    """What a method's ``branch`` uses to rewrite one call of its site."""

    def __init__(self, gm, node, spec: Insertion, training: bool, gate_of=None):
        self.gm, self.node, self.spec, self.training = gm, node, spec, training
        self._gate_of = gate_of
        self.aten = aten
        self.prefix = attribute_prefix(spec.adapter)
        self.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        self.meta[roles.META] = {"adapter": spec.adapter, "site": spec.path, "method": spec.module.method}
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

    def gate(self, rank: int | None = None):
        """This adapter's gate, float32: a scalar, or per batch row shaped to broadcast over the
        site's output (``rank`` dimensions; default the base op's). None when the graph has no gates."""
        if self._gate_of is None:
            return None
        value = self.node.meta.get("val")
        if rank is None:
            rank = value.dim() if value is not None else 2
        # Only a routed call (adapter_ids) needs this, and only the graph shows it for every site: the plan
        # marks the sites it knows of (GPT-2's Conv1D) as unroutable, this catches the rest.
        if self.routed and rank and not self._gate_of.keeps_batch(value):
            raise PlanError(
                f"{self.spec.path} computes on rows that are not the batch's (its output is {tuple(value.shape)}), "
                "so adapter_ids cannot route it",
                hint="GPT-2's Conv1D flattens batch and sequence (surgeon plan lists the sites adapter_ids cannot route); "
                "route models whose linears keep the batch first, or use set_active()",
            )
        return self._gate_of(self.spec.adapter, rank)

    def gated(self, scale):
        """``scale`` (a float or a node) times this adapter's gate; ``scale`` itself when the graph has no gates."""
        gate = self.gate()
        if gate is None:
            return scale
        first = next(iter(self.spec.module.parameters()), None)
        if first is not None and first.dtype != torch.float32:  # keep the adapter's dtype (bf16 adapters, routed)
            gate = self.call(self.aten._to_copy.default, (gate,), roles.GATE, {"dtype": first.dtype})
        return self.call(self.aten.mul.Tensor, (gate, scale), roles.GATE)

    @property
    def routed(self) -> bool:
        """Do gates differ per batch row (an ``adapter_ids`` input)?"""
        return self._gate_of is not None and getattr(self._gate_of, "routed", False)

    def replace_weight(self, node, *, tied: bool = False) -> None:
        """Make the base op read ``node`` (role ``WEIGHT``) instead of its weight.

        With ``tied``, every other op of the graph reading the same tensor (a
        tied output layer) reads ``node`` too.
        """
        weight = self.weight()
        if weight.op != "get_attr":  # planning refuses this (weight-replaced-twice); kept for insertions made by hand
            raise PlanError(
                f"{self.spec.path}: two adapters rewrite this weight ({self.spec.adapter!r} is the second); "
                "one adapter may replace a weight tensor",
                hint="give that change to one adapter (a graph holds every adapter, active or not)",
            )
        readers = [self.node]
        if tied:
            tensor = attribute(self.gm, weight.target)
            for other in self.gm.graph.nodes:
                if other.op == "get_attr" and attribute(self.gm, other.target) is tensor:
                    readers += [(u, other) for u in other.users if u is not node and roles.META not in u.meta]
        for reader in readers:
            user, old = reader if isinstance(reader, tuple) else (reader, weight)
            user.replace_input_with(old, node)

    def param(self, name: str):
        """A get_attr node for the adapter's parameter ``name`` (placed before the base op)."""
        if name not in self._params:
            with self.gm.graph.inserting_before(self.node):
                attr = self.gm.graph.get_attr(f"{self.spec.path}.{self.prefix}{name}")
            attr.meta.update(self.meta)
            attr.meta[roles.META] = {**self.meta[roles.META], "role": roles.param(name)}
            self._params[name] = attr
        return self._params[name]

    def call(self, op, args: tuple, role: str, kwargs: dict | None = None):
        """Insert ``op(*args)`` after the site's current output."""
        return self.after.call(op, args, role, kwargs)

    def call_before(self, op, args: tuple, role: str, kwargs: dict | None = None):
        """Insert ``op(*args)`` right before the base op (for input-side rewrites)."""
        with self.gm.graph.inserting_before(self.node):
            node = self.gm.graph.call_function(op, args, kwargs or {})
        node.meta.update({k: v for k, v in self.meta.items() if k != roles.META})
        node.meta[roles.META] = {**self.meta[roles.META], "role": role}
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
        return self.call(self.aten._to_copy.default, (node,), roles.CAST, {"dtype": dtype})

    def cast_before(self, node, dtype):
        """:meth:`cast`, placed before the base op."""
        if not self._needs_cast(node, dtype):
            return node
        return self.call_before(self.aten._to_copy.default, (node,), roles.CAST, {"dtype": dtype})

    def _needs_cast(self, node, dtype, source=None) -> bool:
        current = self.dtype_of(node) or source
        if node.op == "get_attr" and current is None:  # an adapter parameter: its dtype is known
            current = attribute(self.gm, node.target).dtype
        return dtype is not None and current is not None and current != dtype


def insert_adapters(insertions, *, training: bool, gates: Gates | None = None):
    """A pass that inserts every adapter branch of ``insertions`` into a graph module (gated by ``gates``)."""

    def insert_adapter_branches(gm) -> PassResult:
        changed = False
        gate_of = _GateNodes(gm, gates) if gates is not None else None
        site_nodes = SiteNodes(gm)
        for spec in insertions:
            nodes = site_nodes(spec.path, spec.kind)
            if not nodes:
                raise ValueError(f"no {spec.kind} node computes site '{spec.path}' in this graph")
            owner = gm.get_submodule(spec.path)
            prefix = attribute_prefix(spec.adapter)
            for name, param in spec.module.named_parameters(recurse=False):
                owner.register_parameter(prefix + name, param)
            for name, buffer in spec.module.named_buffers(recurse=False):
                owner.register_buffer(prefix + name, buffer)
            for node in nodes:
                builder = GraphBuilder(gm, node, spec, training, gate_of)
                x = site_args(node, spec.kind)[0]
                current = outermost(node)
                users = [u for u in current.users]
                new_x, new_y = spec.module.branch(builder, x, current)
                if gate_of is not None and not getattr(spec.module, "applies_gate", False):
                    new_x, new_y = _interpolated(builder, x, new_x, roles.IN), _interpolated(builder, current, new_y, roles.OUT)
                if new_x is not None:
                    node.replace_input_with(x, new_x)
                if new_y is not None:
                    for user in users:
                        user.replace_input_with(current, new_y)
                changed = True
        return PassResult(gm, changed)

    return insert_adapter_branches


def _interpolated(builder, value, new, role: str):
    """``value + g (new - value)`` with the joint role ``role`` (``new`` keeps its place in the chain as ungated)."""
    if new is None:
        return None
    new.meta[roles.META] = {**new.meta[roles.META], "role": roles.ungated(role)}
    meta_value = value.meta.get("val") if hasattr(value, "meta") else None
    gate = builder.gate(meta_value.dim() if meta_value is not None else None)
    dtype = builder.dtype_of(value)
    anchor = new
    if dtype is not None and dtype != torch.float32:
        gate = anchor = _after(builder, role, anchor, aten._to_copy.default, (gate,), {"dtype": dtype})
    change = _after(builder, role, anchor, aten.sub.Tensor, (new, value))
    scaled = _after(builder, role, change, aten.mul.Tensor, (change, gate))
    return _after(builder, role, scaled, aten.add.Tensor, (value, scaled), role=role)


def _after(builder, side: str, anchor, op, args, kwargs=None, role: str = roles.GATE):
    """A node right after ``anchor`` (input side: before the base op, where ``anchor`` lives)."""
    if side == roles.IN:
        return builder.call_before(op, args, role, kwargs)
    with builder.gm.graph.inserting_after(anchor):
        node = builder.gm.graph.call_function(op, args, kwargs or {})
    node.meta.update({k: v for k, v in builder.meta.items() if k != roles.META})
    node.meta[roles.META] = {**builder.meta[roles.META], "role": role}
    return node


class _GateNodes:
    """The gate nodes of one graph, made once per adapter (and per output rank when routed)."""

    def __init__(self, gm, gates: Gates):
        self.gm, self.gates, self.routed = gm, gates, gates.routed
        self.index = {name: i for i, name in enumerate(gates.names)}
        self.made: dict = {}
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        meta = {roles.META: {"adapter": None, "site": None, "method": None, "role": roles.GATES}}
        inputs = [n.meta.get("val") for n in placeholders]
        self.batch = next((v.shape[0] for v in inputs if hasattr(v, "shape") and len(v.shape) > 0), None)
        if self.routed:
            self.source = add_keyword_input(gm, ROUTING_INPUT)
        else:
            gm.register_buffer(GATES_BUFFER, gates.tensor)
            with graph.inserting_after(placeholders[-1]):
                self.source = graph.get_attr(GATES_BUFFER)
        self.source.meta.update(meta)
        self.cursor = self.source
        self.aten, self.meta = aten, meta

    def keeps_batch(self, value) -> bool:
        """Is the first dimension of ``value`` the batch (that of the model's first tensor input)?"""
        if value is None or self.batch is None or value.dim() == 0:
            return value is None or self.batch is None
        return str(value.shape[0]) == str(self.batch)

    def _call(self, op, args, kwargs=None):
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.call_function(op, args, kwargs or {})
        node.meta.update(self.meta)
        self.cursor = node
        return node

    def __call__(self, adapter: str, rank: int):
        key = (adapter, rank if self.routed else 0)
        if key not in self.made:
            i = self.index[adapter]
            if not self.routed:
                self.made[key] = self._call(self.aten.select.int, (self.source, 0, i))
            else:
                rows = self.made.get((adapter, "rows"))
                if rows is None:
                    hit = self._call(self.aten.eq.Scalar, (self.source, i))
                    rows = self.made[(adapter, "rows")] = self._call(self.aten._to_copy.default, (hit,), {"dtype": torch.float32})
                self.made[key] = self._call(self.aten.view.default, (rows, [-1] + [1] * (rank - 1))) if rank > 1 else rows
        return self.made[key]


def add_keyword_input(gm, name: str):
    """Give the graph module a new keyword input ``name`` (its pytree signature updated); its placeholder node."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(name)
    info = graph._codegen.pytree_info
    leaves = [object()] * info.in_spec.num_leaves
    args, kwargs = tree_unflatten(leaves, info.in_spec)
    _, in_spec = tree_flatten((args, {**kwargs, name: torch.empty(0)}))
    graph._codegen.pytree_info = info._replace(orig_args=[*info.orig_args, name], in_spec=in_spec)
    gm._in_spec = in_spec
    return node
