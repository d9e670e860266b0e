"""Small helpers over torch.fx graphs shared by the passes."""

from __future__ import annotations

__all__ = ["attribute", "module_path", "SiteNodes", "site_args", "adapter_nodes", "Inserter"]


def attribute(gm, target: str):
    """The tensor (or module) a get_attr ``target`` names on ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_path(node) -> str | None:
    """The path of the innermost module a node ran in (from ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0] or None


def _site_ops():
    import torch

    aten = torch.ops.aten
    return {
        "linear": aten.linear.default,
        "hf_conv1d": aten.addmm.default,
        "embedding": aten.embedding.default,
        "conv1d": aten.conv1d.default,
        "conv2d": aten.conv2d.default,
        "conv3d": aten.conv3d.default,
    }


class SiteNodes:
    """The graph nodes computing each site (a module called twice has two), for many sites from one walk of the graph (a pass over every site of a
    7B model would otherwise walk its thousands of nodes once per site). The base ops a pass
    finds stay where they are, so the index stays true while adapter nodes come and go."""

    def __init__(self, gm):
        ops = set(_site_ops().values()) | set(_quantized_bias())
        self.by_path: dict = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in ops and "surgeon" not in n.meta:
                self.by_path.setdefault(module_path(n), []).append(n)

    def __call__(self, path: str, kind: str) -> list:
        ops = {_site_ops().get(kind)} | (set(_quantized_bias()) if kind == "linear" else set())
        return [n for n in self.by_path.get(path, ()) if n.target in ops]


def site_args(node, kind: str) -> tuple:
    """(input, weight, bias or None) of a site's op: linear(x, W[, b]), addmm(b, x, W), embedding(W, ids)."""
    if kind == "linear" and node.target in _quantized_bias():  # surgeon.linear_4bit / linear_8bit (kernels/quantized.py)
        index = _quantized_bias()[node.target]
        return node.args[0], node.args[1], node.args[index]
    if kind == "linear" or kind.startswith("conv"):
        return node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    if kind == "hf_conv1d":
        return node.args[1], node.args[2], node.args[0]
    if kind == "embedding":
        return node.args[1], node.args[0], None
    raise ValueError(f"no graph rule for sites of kind {kind}")


def _quantized_bias() -> dict:
    """The quantized linear ops and the position of their bias argument."""
    from surgeon.kernels.quantized import QUANTIZED_OPS

    return dict(zip(QUANTIZED_OPS, (6, 3)))


def adapter_nodes(gm, *, role: str | None = None, site: str | None = None, adapter: str | None = None) -> list:
    """Nodes the insert pass added, filtered by their ``meta["surgeon"]`` record."""
    found = []
    for n in gm.graph.nodes:
        record = n.meta.get("surgeon")
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
        node.meta.update({k: v for k, v in self.meta.items() if k != "surgeon"})
        node.meta["surgeon"] = {**self.meta.get("surgeon", {}), "role": role}
        self.cursor = node
        return node

    def get_attr(self, target: str, role: str):
        with self.graph.inserting_after(self.cursor):
            return self._tag(self.graph.get_attr(target), role)

    def call(self, op, args: tuple, role: str, kwargs: dict | None = None):
        with self.graph.inserting_after(self.cursor):
            return self._tag(self.graph.call_function(op, args, kwargs or {}), role)
