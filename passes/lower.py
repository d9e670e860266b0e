"""The lowering pass: LoRA branches on linear sites become one fused ``surgeon::lora_linear`` call.

After insertion a LoRA site reads::

    y = linear(x, W, b);  h = linear(x, A);  d = linear(h, B);  out = y + d * s

and this pass rewrites it to ``out = surgeon.lora_linear(x, W, b, A, B, s)``
(surgeon/kernels: Triton kernels on CUDA, the same math in torch elsewhere; an
autograd formula, a fake implementation for export and torch.compile). Only
the pattern exactly is lowered: a site with dropout on the adapter input, a
dtype cast, a bias on B, PiSSA's residual or another method stays as plain
aten ops, as does every site of a non-LoRA method. Folding works on the graph
before this pass.

A DoRA site (a plain linear, no dropout, no dtype cast, a scalar gate) becomes
one ``surgeon.dora_linear(x, W, b, A, B, s, m, gate)``: the factored row
norm and ``m / n`` applied in the fused epilogue, instead of the branch's
dozen skinny products and elementwise passes over y.

In a routed graph (``adapter_ids``), a site's chain of plain LoRA
branches, one per adapter, each masked by ``adapter_ids == i``, becomes one
``surgeon.routed_lora_linear(x, W, b, A_stack, B_stack, scales, local_ids)``:
the adapters' A and B zero-padded to the largest rank and stacked (small
copies per call), ``local_ids`` the position of each row's adapter among this
site's (-1: none), so each row runs only its own adapter.
"""

from __future__ import annotations

from surgeon.passes._graph import attribute
from surgeon.passes.pipeline import PassResult

__all__ = ["lower_adapters"]


def lower_adapters(*, routed: bool = False, dora: bool = True):
    """A pass lowering every eligible LoRA (and, with ``dora``, DoRA) branch to the fused ops (a routed
    graph's to the routed op)."""

    def lower_lora_to_fused_kernels(gm) -> PassResult:
        if routed:
            return _lower_routed(gm)
        import importlib

        import torch

        importlib.import_module("surgeon.kernels.lora_linear")  # registers torch.ops.surgeon.lora_linear

        aten, graph = torch.ops.aten, gm.graph
        fused_op = torch.ops.surgeon.lora_linear.default
        changed = False
        for out in list(graph.nodes):
            record = out.meta.get("surgeon", {})
            if record.get("role") == "out" and record.get("method") == "dora":
                changed |= dora and _lower_dora(gm, out, record)
                continue
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


def _lower_dora(gm, out, record) -> bool:
    """Replace a DoRA site's branch (see DoRA's ``branch``) by one ``surgeon::dora_linear`` call, when it is
    exactly ``y + g ((m/n - 1)(y - b) + (m/n) s B A x)`` on a plain linear ``y`` with a scalar gate g;
    True when it did."""
    import importlib

    import torch

    importlib.import_module("surgeon.kernels.dora")  # registers torch.ops.surgeon.dora_linear
    aten, graph = torch.ops.aten, gm.graph
    mine = lambda n: {k: n.meta.get("surgeon", {}).get(k) for k in ("site", "adapter")} == {"site": record["site"], "adapter": record["adapter"]}  # noqa: E731
    nodes = [n for n in graph.nodes if mine(n)]
    roles: dict = {}
    for node in nodes:
        roles.setdefault(node.meta["surgeon"]["role"], []).append(node)
    y, gated = out.args
    if roles.keys() - {"norm", "factor", "shrink", "expand", "dora", "gate", "out", "base"} - {r for r in roles if r.startswith("param:")}:
        return False  # dropout, a dtype cast, Conv1D's transposed rows, ...: stays plain
    if out.target is not aten.add.Tensor or getattr(y, "target", None) is not aten.linear.default or "surgeon" in y.meta:
        return False
    if any(not mine(u) for u in y.users) or getattr(gated, "target", None) is not aten.mul.Tensor:
        return False
    change, gate = gated.args
    value = gate.meta.get("val") if hasattr(gate, "meta") else None
    scaled = change.args[1] if getattr(change, "target", None) is aten.add.Tensor else None
    params = [roles.get(f"param:{name}", [None])[0] for name in ("lora_A", "lora_B", "lora_magnitude_vector")]
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
        node.meta["surgeon"] = {**record, "role": "scale" if node is scale else "fused"}
    fused.meta.update({k: v for k, v in out.meta.items() if k != "surgeon"})
    out.replace_all_uses_with(fused)
    for node in reversed(list(graph.nodes)):  # the branch and the base linear, now unused
        if (node is y or mine(node)) and node is not fused and not node.users and node.op == "call_function":
            graph.erase_node(node)
    return True


def _lower_routed(gm) -> PassResult:
    import importlib

    import torch

    importlib.import_module("surgeon.kernels.routed_lora")  # registers torch.ops.surgeon.routed_lora_linear
    aten, graph = torch.ops.aten, gm.graph
    ids = next((n for n in graph.nodes if n.op == "placeholder" and n.target == "adapter_ids"), None)
    if ids is None:
        return PassResult(gm, False)
    changed = False
    for y in list(graph.nodes):
        if y.target is not aten.linear.default or "surgeon" in y.meta:
            continue
        chain, current = [], y
        while True:  # the site's LoRA branches, innermost first, each wrapping the one before
            out = next((u for u in current.users if u.meta.get("surgeon", {}).get("role") == "out" and u.args[0] is current), None)
            branch = _routed_branch(out, current, y, aten) if out is not None else None
            if branch is None:
                break
            chain.append(branch)
            current = out
        if not chain or any(u is not chain[0][0] for u in y.users):
            continue
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
        fused.meta.update({k: v for k, v in last.meta.items() if k != "surgeon"})
        fused.meta["surgeon"] = {**last.meta["surgeon"], "adapter": None, "role": "fused"}
        last.replace_all_uses_with(fused)
        for node in reversed(list(graph.nodes)):  # the masked branches, now unused
            if node.meta.get("surgeon", {}).get("site") == last.meta["surgeon"]["site"] and not node.users and node.op == "call_function":
                graph.erase_node(node)
        if not y.users:
            graph.erase_node(y)
        changed = True
    return PassResult(gm, changed)


def _routed_branch(out, inner, y, aten):
    """(out, A, B, scale, adapter index) of a plain routed LoRA branch wrapping ``inner``, else None."""
    record = out.meta.get("surgeon", {})
    if record.get("method") != "lora" or out.target is not aten.add.Tensor or len(out.users) == 0:
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
    return attribute(node.graph.owning_module, node.target).shape[0]
