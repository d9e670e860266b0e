"""The lowering pass: LoRA branches on linear sites become one fused ``surgeon::lora_linear`` call.

After insertion a LoRA site reads::

    y = linear(x, W, b);  h = linear(x, A);  d = linear(h, B);  out = y + d * s

and this pass rewrites it to ``out = surgeon.lora_linear(x, W, b, A, B, s)``
(surgeon/kernels: Triton kernels on CUDA, the same math in torch elsewhere; an
autograd formula, a fake implementation for export and torch.compile). Only
the pattern exactly is lowered: a site with dropout on the adapter input, a
dtype cast, a bias on B, PiSSA's residual, per-row gates (routing) or another
method stays as plain aten ops, as does every site of a non-LoRA method.
Folding works on the graph before this pass.
"""

from __future__ import annotations

from .pipeline import PassResult

__all__ = ["lower_adapters"]


def lower_adapters(*, routed: bool = False):
    """A pass lowering every eligible LoRA branch to the fused op (none in a routed graph: its gates are per row)."""

    def lower_lora_to_fused_kernels(gm) -> PassResult:
        if routed:
            return PassResult(gm, False)
        import importlib

        import torch

        importlib.import_module("surgeon.kernels.lora_linear")  # registers torch.ops.surgeon.lora_linear

        aten, graph = torch.ops.aten, gm.graph
        fused_op = torch.ops.surgeon.lora_linear.default
        changed = False
        for out in list(graph.nodes):
            record = out.meta.get("surgeon", {})
            if record.get("role") != "out" or record.get("method") != "lora" or out.target is not aten.add.Tensor:
                continue
            pattern = _match(out, aten)
            if pattern is None:
                continue
            y, scaled, expand, shrink, (x, weight, bias, lora_a, lora_b, scale) = pattern
            with graph.inserting_before(out):
                if not isinstance(scale, torch.fx.Node):
                    scale = graph.call_function(aten.scalar_tensor.default, (float(scale),), {"dtype": torch.float32})
                    scale.meta["surgeon"] = {**record, "role": "scale"}
                fused = graph.call_function(fused_op, (x, weight, bias, lora_a, lora_b, scale))
            fused.meta.update({k: v for k, v in out.meta.items() if k != "surgeon"})
            fused.meta["surgeon"] = {**record, "role": "fused"}
            out.replace_all_uses_with(fused)
            for node in (out, scaled, expand, shrink, y):
                if not node.users:
                    graph.erase_node(node)
            changed = True
        return PassResult(gm, changed)

    return lower_lora_to_fused_kernels


def _match(out, aten):
    """(y, scaled, expand, shrink, fused op arguments) when ``out`` is exactly a plain LoRA branch, else None."""
    y, scaled = out.args
    if getattr(y, "target", None) is not aten.linear.default or "surgeon" in y.meta or len(y.users) != 1:
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
