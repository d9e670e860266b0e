"""DoRA's lowering pattern: a site's branch as one ``surgeon.dora_linear`` call (the driver is passes/lower.py).

A DoRA site (a plain linear, no dropout, no dtype cast, a scalar gate) becomes one
``surgeon.dora_linear(x, W, b, A, B, s, m, gate)``: the factored row norm and ``m / n`` applied in the
fused epilogue, instead of the branch's dozen skinny products and elementwise passes over y. Its torch
fallback does not beat the plain branch, so it is lowered only where the fused kernels run.
"""

from __future__ import annotations

import torch

import surgeon.kernels.dora  # noqa: F401 - registers torch.ops.surgeon.dora_linear

from surgeon.methods import node_roles as roles
from surgeon.methods.dora.config import DoraConfig
from surgeon.methods.dora.site import CHANGE
from surgeon.methods.lowering import LoweringPattern

__all__ = ["PATTERNS"]

aten = torch.ops.aten
METHOD = DoraConfig.method_name
# The roles of a branch the fused op computes whole (a dropout, a cast or Conv1D's transposed rows is not).
_FUSABLE = {roles.NORM, roles.FACTOR, roles.SHRINK, roles.EXPAND, CHANGE, roles.GATE, roles.OUT, roles.BASE}


def lower_dora(gm, out) -> bool:
    """Replace a DoRA site's branch (see site.py's ``branch``) by one ``surgeon::dora_linear`` call, when it is
    exactly ``y + g ((m/n - 1)(y - b) + (m/n) s B A x)`` on a plain linear ``y`` with a scalar gate g;
    True when it did."""
    record = roles.record(out)
    if record.get("role") != roles.OUT or record.get("method") != METHOD:
        return False
    graph = gm.graph
    mine = lambda n: {k: roles.record(n).get(k) for k in ("site", "adapter")} == {"site": record["site"], "adapter": record["adapter"]}  # noqa: E731
    nodes = [n for n in graph.nodes if mine(n)]
    found: dict = {}
    for node in nodes:
        found.setdefault(roles.role_of(node), []).append(node)
    y, gated = out.args
    if found.keys() - _FUSABLE - {r for r in found if r.startswith(roles.PARAM)}:
        return False  # dropout, a dtype cast, Conv1D's transposed rows, ...: stays plain
    if out.target is not aten.add.Tensor or getattr(y, "target", None) is not aten.linear.default or roles.META in y.meta:
        return False
    if any(not mine(u) for u in y.users) or getattr(gated, "target", None) is not aten.mul.Tensor:
        return False
    change, gate = gated.args
    value = gate.meta.get("val") if hasattr(gate, "meta") else None
    scaled = change.args[1] if getattr(change, "target", None) is aten.add.Tensor else None
    params = [found.get(roles.param(name), [None])[0] for name in ("lora_A", "lora_B", "lora_magnitude_vector")]
    scalar_gate = getattr(gate, "target", None) is aten.select.int or (value is not None and value.numel() == 1)
    if None in params or not scalar_gate:
        return False  # a per-row (routed) gate
    if getattr(scaled, "target", None) is not aten.mul.Tensor or not isinstance(scaled.args[1], (int, float)):
        return False
    x, weight = y.args[0], y.args[1]
    bias = y.args[2] if len(y.args) > 2 else None
    with graph.inserting_before(out):
        scale = graph.call_function(aten.scalar_tensor.default, (float(scaled.args[1]),), {"dtype": torch.float32})
        fused = graph.call_function(torch.ops.surgeon.dora_linear.default, (x, weight, bias, *params[:2], scale, params[2], gate))
    for node in (scale, fused):
        node.meta[roles.META] = {**record, "role": roles.SCALE if node is scale else roles.FUSED}
    fused.meta.update({k: v for k, v in out.meta.items() if k != roles.META})
    out.replace_all_uses_with(fused)
    for node in reversed(list(graph.nodes)):  # the branch and the base linear, now unused
        if (node is y or mine(node)) and node is not fused and not node.users and node.op == "call_function":
            graph.erase_node(node)
    return True


PATTERNS = (LoweringPattern("dora on a linear -> surgeon::dora_linear", METHOD, lower_dora, "surgeon.kernels.dora"),)
