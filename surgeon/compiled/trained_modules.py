"""``train`` modules in the graphs: their trainable copies read through their adapters' gates, and folded.

A module that ``train`` rules train has one trainable copy (however many
adapters train it) that stands in for its parameters. In the graphs each such
parameter is read as ``lerp(base, copy, g)``, g the largest gate among the
adapters that train the module: exact at g = 0 and 1, so switching adapters
switches the trained modules too. A fold replaces each lerp by one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.methods.node_roles import GATES_BUFFER, META, TRAINED, attribute, record, role_of
from surgeon.passes import PassResult

from surgeon.compiled.building import site_key

__all__ = ["gate_trained_modules", "fold_trained_modules"]


def gate_trained_modules(trained: tuple, adapter_names: tuple, copies, base_model: nn.Module):
    """A pass: the graph reads each trained copy's parameter as lerp(base, copy, g) (exact at g = 0 and 1),
    g = the largest gate among the adapters that train the module, so switching adapters switches them too.

    ``trained``: the plan's trained modules (adapter, path); ``copies``: site key -> the trainable copy;
    ``base_model``: the model whose parameters are the bases."""

    def gate_trained_module_parameters(gm) -> PassResult:
        if not trained:
            return PassResult(gm, False)
        aten = torch.ops.aten
        graph = gm.graph
        gates = next(n for n in graph.nodes if n.op == "get_attr" and n.target == GATES_BUFFER)
        index = {n: i for i, n in enumerate(adapter_names)}
        for t_path in dict.fromkeys(t.path for t in trained):
            owners = [index[t.adapter] for t in trained if t.path == t_path]
            module = copies[site_key(t_path)]
            for name, _ in module.named_parameters():
                target = f"{t_path}.{name}"
                base_target = f"{t_path}.surgeon_base__{name.replace('.', '__')}"
                owner_path, _, leaf = base_target.rpartition(".")
                gm.get_submodule(owner_path).register_buffer(leaf, base_model.get_parameter(target))
                dtype = base_model.get_parameter(target).dtype
                for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == target and n.users]:
                    made = []
                    order = {n: i for i, n in enumerate(graph.nodes)}
                    first_user = min(node.users, key=order.__getitem__)  # after the gates, before any use

                    def add(op, args, kwargs=None):
                        with graph.inserting_before(first_user):
                            made.append(graph.call_function(op, args, kwargs or {}) if op else graph.get_attr(args))
                        return made[-1]

                    base = add(None, base_target)
                    gate = add(aten.select.int, (gates, 0, owners[0]))
                    for i in owners[1:]:  # several adapters train this module: it acts when any does
                        gate = add(aten.maximum.default, (gate, add(aten.select.int, (gates, 0, i))))
                    gate = add(aten._to_copy.default, (gate,), {"dtype": dtype})
                    mixed = add(aten.lerp.Tensor, (base, node, gate))
                    node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
                    for n in made:
                        n.meta[META] = {"adapter": None, "site": t_path, "method": "train", "role": TRAINED}
        return PassResult(gm, True)

    return gate_trained_module_parameters


def fold_trained_modules(trained: tuple, weights: dict, merged: dict | None = None):
    """A pass: each gated parameter of a trained module becomes one tensor, lerp(base, copy, w), read under the
    parameter's own name, w = the largest of ``weights`` (adapter -> strength) among the adapters that train it
    (``trained``: the plan's trained modules). ``merged`` keeps those tensors (("trained", name) -> tensor) as
    fold_adapters keeps the sites': a copy of the trained parameter, so that the folded graph does not change
    when training goes on."""
    merged = {} if merged is None else merged

    def fold_trained_module_parameters(gm) -> PassResult:
        aten = torch.ops.aten
        changed = False
        for node in list(gm.graph.nodes):
            found = record(node)
            if found.get("role") != TRAINED or node.target is not aten.lerp.Tensor:
                continue
            base_node, copy_node = node.args[0], node.args[1]
            key = ("trained", copy_node.target)
            if key not in merged:
                owners = {t.adapter for t in trained if t.path == found["site"]}
                w = max(weights.get(a, 0.0) for a in owners)
                base, copy = attribute(gm, base_node.target), attribute(gm, copy_node.target).detach()
                with torch.no_grad():
                    merged[key] = base if w == 0 else nn.Parameter(copy.clone() if w == 1 else torch.lerp(base, copy, w),
                                                                  requires_grad=False)
            owner_path, _, leaf = copy_node.target.rpartition(".")
            setattr(gm.get_submodule(owner_path), leaf, merged[key])  # the folded module's own tree (copy_graph_module)
            node.replace_all_uses_with(copy_node)
            changed = True
        for node in reversed(list(gm.graph.nodes)):  # the gating nodes, and the base copies they read
            if role_of(node) == TRAINED and not node.users:
                gm.graph.erase_node(node)
        for name, module in list(gm.named_modules()):
            for leaf in [a for a in (*module._buffers, *module._parameters) if a.startswith("surgeon_base__")]:
                if not any(n.op == "get_attr" and n.target == f"{name}.{leaf}".lstrip(".") for n in gm.graph.nodes):
                    delattr(module, leaf)
        return PassResult(gm, changed)

    return fold_trained_module_parameters
