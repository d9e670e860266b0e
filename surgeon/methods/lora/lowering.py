"""LoRA's lowering patterns: its branches as one fused kernel call (surgeon/kernels; the driver is passes/lower.py).

After insertion a LoRA site reads::

    y = linear(x, W, b);  h = linear(x, A);  d = linear(h, B);  out = y + d * s

and the fused pattern rewrites it to ``out = surgeon.lora_linear(x, W, b, A, B, s)`` (Triton kernels on
CUDA, the same math in torch elsewhere, which on the CPU still spares the adapter's passes over each
output: ``fallback_pays``). Only the pattern exactly is lowered: a site with dropout on the adapter input,
a dtype cast, a bias on B, PiSSA's residual or a convolution stays as plain aten ops.

In a routed graph (``adapter_ids``), a site's chain of plain LoRA branches, one per adapter, each masked
by ``adapter_ids == i``, becomes one ``surgeon.routed_lora_linear(x, W, b, A_stack, B_stack, scales,
local_ids)``: the adapters' A and B zero-padded to the largest rank and stacked (small copies per call),
``local_ids`` the position of each row's adapter among this site's (-1: none), so each row runs only its
own adapter.
"""

from __future__ import annotations

import torch

import surgeon.kernels.lora_linear  # noqa: F401 - registers torch.ops.surgeon.lora_linear
import surgeon.kernels.routed_lora  # noqa: F401 - registers torch.ops.surgeon.routed_lora_linear

from surgeon.methods import node_roles as roles
from surgeon.methods.lora.config import LoraConfig
from surgeon.methods.lowering import LoweringPattern

__all__ = ["PATTERNS", "match_plain"]

aten = torch.ops.aten
METHOD = LoraConfig.method_name


def match_plain(out):
    """(y, scaled, expand, shrink, fused op arguments) when ``out`` is exactly a plain LoRA branch, else None."""
    record = roles.record(out)
    if record.get("role") != roles.OUT or record.get("method") != METHOD or out.target is not aten.add.Tensor:
        return None
    y, scaled = out.args
    if getattr(y, "target", None) is not aten.linear.default or roles.META in y.meta or len(y.users) != 1:
        return None
    if getattr(scaled, "target", None) is not aten.mul.Tensor or len(scaled.users) != 1:
        return None
    expand, scale = scaled.args
    if getattr(expand, "target", None) is not aten.linear.default or len(expand.args) != 2 or len(expand.users) != 1:
        return None
    shrink, lora_b = expand.args
    if getattr(shrink, "target", None) is not aten.linear.default or len(shrink.args) != 2 or len(shrink.users) != 1:
        return None
    x_in, lora_a = shrink.args
    x, weight = y.args[0], y.args[1]
    bias = y.args[2] if len(y.args) > 2 else None
    if x_in is not x:  # a cast or dropout between the site's input and the adapter
        return None
    return y, scaled, expand, shrink, (x, weight, bias, lora_a, lora_b, scale)


def lower_plain(gm, out) -> bool:
    """``out = y + s B A x`` (a plain LoRA branch on a linear) -> ``surgeon.lora_linear``; True when it did."""
    found = match_plain(out)
    if found is None:
        return False
    graph, record = gm.graph, roles.record(out)
    y, scaled, expand, shrink, (x, weight, bias, lora_a, lora_b, scale) = found
    with graph.inserting_before(out):
        if not isinstance(scale, torch.fx.Node):
            scale = graph.call_function(aten.scalar_tensor.default, (float(scale),), {"dtype": torch.float32})
            scale.meta[roles.META] = {**record, "role": roles.SCALE}
        fused = graph.call_function(torch.ops.surgeon.lora_linear.default, (x, weight, bias, lora_a, lora_b, scale))
    fused.meta.update({k: v for k, v in out.meta.items() if k != roles.META})
    fused.meta[roles.META] = {**record, "role": roles.FUSED}
    out.replace_all_uses_with(fused)
    for node in (out, scaled, expand, shrink, y):
        if not node.users:
            graph.erase_node(node)
    return True


def lower_routed(gm, y) -> bool:
    """A base linear ``y`` wrapped by a chain of plain routed LoRA branches -> ``surgeon.routed_lora_linear``."""
    if y.op != "call_function" or y.target is not aten.linear.default or roles.META in y.meta:
        return False
    graph = gm.graph
    ids = next((n for n in graph.find_nodes(op="placeholder") if n.target == "adapter_ids"), None)
    if ids is None:
        return False
    chain, current = [], y
    while True:  # the site's LoRA branches, innermost first, each wrapping the one before
        out = next((u for u in current.users if roles.role_of(u) == roles.OUT and u.args[0] is current), None)
        branch = _routed_branch(out, y) if out is not None else None
        if branch is None:
            break
        chain.append(branch)
        current = out
    if not chain or any(u is not chain[0][0] for u in y.users):
        return False
    x, weight = y.args[0], y.args[1]
    bias = y.args[2] if len(y.args) > 2 else None
    rank = max(_rank(a) for _, a, _, _, _ in chain)
    with graph.inserting_before(chain[-1][0]):
        a_pads = [graph.call_function(aten.constant_pad_nd.default, (a, [0, 0, 0, rank - _rank(a)])) for _, a, _, _, _ in chain]
        b_pads = [graph.call_function(aten.constant_pad_nd.default, (b, [0, rank - _rank(a)])) for _, a, b, _, _ in chain]
        a_stack = graph.call_function(aten.stack.default, (a_pads,))
        b_stack = graph.call_function(aten.stack.default, (b_pads,))
        scales = graph.call_function(aten.stack.default, (
            [graph.call_function(aten.scalar_tensor.default, (float(s),), {"dtype": torch.float32}) for *_, s, _ in chain],))
        local = None  # the row's adapter among this site's: sum_j [ids == i_j] (j + 1), minus 1
        for j, (*_, index) in enumerate(chain):
            hit = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.eq.Scalar, (ids, index)), j + 1))
            local = hit if local is None else graph.call_function(aten.add.Tensor, (local, hit))
        local = graph.call_function(aten.sub.Tensor, (local, 1))
        fused = graph.call_function(torch.ops.surgeon.routed_lora_linear.default, (x, weight, bias, a_stack, b_stack, scales, local))
    last = chain[-1][0]
    fused.meta.update({k: v for k, v in last.meta.items() if k != roles.META})
    fused.meta[roles.META] = {**roles.record(last), "adapter": None, "role": roles.FUSED}
    last.replace_all_uses_with(fused)
    site = roles.record(last)["site"]
    for node in reversed(list(graph.nodes)):  # the masked branches, now unused
        if roles.record(node).get("site") == site and not node.users and node.op == "call_function":
            graph.erase_node(node)
    if not y.users:
        graph.erase_node(y)
    return True


def _routed_branch(out, y):
    """(out, A, B, scale, adapter index) of a plain routed LoRA branch on ``y``'s input, else None."""
    if roles.record(out).get("method") != METHOD or out.target is not aten.add.Tensor or len(out.users) == 0:
        return None
    scaled = out.args[1]
    if getattr(scaled, "target", None) is not aten.mul.Tensor:
        return None
    expand, gate_scale = scaled.args
    if getattr(expand, "target", None) is not aten.linear.default or len(expand.args) != 2:
        return None
    shrink, lora_b = expand.args
    if getattr(shrink, "target", None) is not aten.linear.default or len(shrink.args) != 2 or shrink.args[0] is not y.args[0]:
        return None
    # gate_scale = mul(view(_to_copy(eq(adapter_ids, i))), s)
    if getattr(gate_scale, "target", None) is not aten.mul.Tensor or not isinstance(gate_scale.args[1], (int, float)):
        return None
    view = gate_scale.args[0]
    convert = view.args[0] if getattr(view, "target", None) is aten.view.default else view
    eq = convert.args[0] if getattr(convert, "target", None) is aten._to_copy.default else None
    if getattr(eq, "target", None) is not aten.eq.Scalar:
        return None
    return out, shrink.args[1], lora_b, gate_scale.args[1], eq.args[1]


def _rank(node) -> int:
    """The rank of a LoRA A parameter node (its rows)."""
    return roles.attribute(node.graph.owning_module, node.target).shape[0]


PATTERNS = (
    LoweringPattern("lora on a linear -> surgeon::lora_linear", METHOD, lower_plain, "surgeon.kernels.lora_linear",
                    fallback_pays=True),
    LoweringPattern("routed lora on a linear -> surgeon::routed_lora_linear", METHOD, lower_routed,
                    "surgeon.kernels.routed_lora", routed=True),
)
