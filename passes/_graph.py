"""Small helpers over torch.fx graphs shared by the passes."""

from __future__ import annotations

import torch

from surgeon.kernels.quantized import QUANTIZED_OPS

from surgeon.methods import node_roles as roles
from surgeon.methods.node_roles import attribute

__all__ = ["attribute", "module_path", "SiteNodes", "site_args", "adapter_nodes", "Inserter"]

_aten = torch.ops.aten
# The base op of each site kind (surgeon/methods/_registry.py SITE_KINDS).
_SITE_OPS = {
    "linear": _aten.linear.default,
    "hf_conv1d": _aten.addmm.default,
    "embedding": _aten.embedding.default,
    "conv1d": _aten.conv1d.default,
    "conv2d": _aten.conv2d.default,
    "conv3d": _aten.conv3d.default,
}
# The quantized linear ops (kernels/quantized.py: surgeon.linear_4bit, linear_8bit) and the position of their bias.
_QUANTIZED_BIAS = dict(zip(QUANTIZED_OPS, (6, 3)))


def module_path(node) -> str | None:
    """The path of the innermost module a node ran in (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0] or None


class SiteNodes:
    """The graph nodes computing each site (a module called twice has two), for many sites from one walk of the graph (a pass over every site of a
    7B model would otherwise walk its thousands of nodes once per site). The base ops a pass
    finds stay where they are, so the index stays true while adapter nodes come and go."""

    def __init__(self, gm):
        ops = set(_SITE_OPS.values()) | set(_QUANTIZED_BIAS)
        self.by_path: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in ops and roles.META not in n.meta:
                self.by_path.setdefault(module_path(n), []).append(n)

    def __call__(self, path: str, kind: str) -> list:
        ops = {_SITE_OPS.get(kind)} | (set(_QUANTIZED_BIAS) if kind == "linear" else set())
        return [n for n in self.by_path.get(path, ()) if n.target in ops]


def site_args(node, kind: str) -> tuple:
    """(input, weight, bias or None) of a site's op: linear(x, W[, b]), addmm(b, x, W), embedding(W, ids)."""
    if kind == "linear" and node.target in _QUANTIZED_BIAS:
        return node.args[0], node.args[1], node.args[_QUANTIZED_BIAS[node.target]]
    if kind == "linear" or kind.startswith("conv"):
        return node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    if kind == "hf_conv1d":
        return node.args[1], node.args[2], node.args[0]
    if kind == "embedding":
        return node.args[1], node.args[0], None
    raise ValueError(f"no graph rule for sites of kind {kind}")


def adapter_nodes(gm, *, role: str | None = None, site: str | None = None, adapter: str | None = None) -> list:
    """Nodes the insert pass added, filtered by their ``meta["surgeon"]`` record (roles: surgeon/methods/node_roles.py)."""
    found = []
    for n in gm.graph.nodes:
        record = n.meta.get(roles.META)
        if record is None:
            continue
        if role is not None and record.get("role") != role:
            continue
        if site is not None and record.get("site") != site:
            continue
        if adapter is not None and record.get("adapter") != adapter:
            continue
        found.append(n)
    return found


class Inserter:
    """Inserts nodes one after another, in order, each tagged with the same metadata."""

    def __init__(self, graph, after, meta: dict):
        self.graph, self.cursor, self.meta = graph, after, meta

    def _tag(self, node, role: str):
        node.meta.update({k: v for k, v in self.meta.items() if k != roles.META})
        node.meta[roles.META] = {**self.meta.get(roles.META, {}), "role": role}
        self.cursor = node
        return node

    def get_attr(self, target: str, role: str):
        with self.graph.inserting_after(self.cursor):
            return self._tag(self.graph.get_attr(target), role)

    def call(self, op, args: tuple, role: str, kwargs: dict | None = None):
        with self.graph.inserting_after(self.cursor):
            return self._tag(self.graph.call_function(op, args, kwargs or {}), role)
