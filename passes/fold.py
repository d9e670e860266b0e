"""The fold pass: merge every adapter into its base weight and take its nodes out.

Each method says how it merges (``SiteAdapter.fold``); for a low-rank update::

    W' = W + scale * B @ A          (linear: W is (out, in))
    W' = W + (scale * B @ A)^T      (GPT-2 Conv1D: W is (in, out))
    b' = b + scale * b_B            (adapters with a bias)

Several adapters on one site fold in the order they were inserted. The merge
is computed in float32 (float64 for a float64 weight: :func:`merge_dtype`)
and rounded once to the weight's dtype. The folded
graph has exactly the base graph's op sequence. The new weights are new
tensors set on the graph module (the user's model and the unfolded graph keep
theirs). A ``merged`` dict given to the pass keeps them, by site: a second
graph of the same model (another call signature) folded with that dict reads
the very same tensors, computed once (surgeon/compiled/merged_model.py writes them into the
model for an in-place fold and reads a merged checkpoint from them).

:func:`verify_fold` runs the folded and unfolded graphs on the same inputs and
raises :class:`FoldError` when they differ beyond a tolerance for the dtype.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import torch
from torch.utils._pytree import tree_leaves

from surgeon.diagnostics import FoldError

from surgeon.kernels.quantized import QUANTIZED_OPS

from surgeon.methods import node_roles as roles
from surgeon.passes._graph import SiteNodes, attribute, site_args
from surgeon.passes.fold_quantized import dequantize_graph_site, graph_weight, requantize_graph_site
from surgeon.passes.insert import GATES_BUFFER, attribute_prefix
from surgeon.passes.pipeline import PassResult

__all__ = ["merge_dtype", "fold_weighted", "fold_adapters", "verify_fold", "output_difference", "FoldError",
           "copy_graph_module", "TOLERANCES"]

# Roles of the nodes that stand in for a value of the base graph (the site's output, input or
# weight), each with the value it replaces as its first argument.

# (rtol, atol relative to the output's largest magnitude) by dtype of the outputs.
TOLERANCES = {"float32": (1e-4, 1e-5), "float64": (1e-9, 1e-10), "bfloat16": (2e-2, 2e-2), "float16": (5e-3, 5e-3)}


def merge_dtype(dtype):
    """The dtype merges are computed in: float32, or the weight's own when wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def copy_graph_module(gm):
    """A new graph module with its own graph and module tree, sharing gm's tensors."""
    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated copy path
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def fold_adapters(insertions, *, weights: dict | None = None, quantized: str = "dequantize", merged: dict | None = None):
    """A pass that folds every adapter of ``insertions``.

    ``weights`` (adapter name -> w, default 1) folds each adapter with a
    strength: ``W + w (fold(W) - W)``, the gated graph's interpolation, exact
    at w = 1; an adapter with w = 0 is left out. A site on a bitsandbytes
    weight (kernels/quantized.py) is merged in float32 from its dequantized
    weight, then ``quantized`` decides: "dequantize" makes it a plain linear
    on the merged weight in its compute dtype, "requantize" quantizes the
    merged weight again with the site's own scheme (which adds error).

    ``merged`` ((path, kind) -> (weight, bias) parameters, or ("quantized", full-precision weight)) is filled
    with what the pass computes, and what it already holds is used instead of computing it again.
    """
    weights = weights or {}
    merged = {} if merged is None else merged

    def fold_adapter_branches(gm) -> PassResult:
        by_site: dict = {}
        for spec in insertions:
            by_site.setdefault((spec.path, spec.kind), []).append(spec)
        if not by_site:
            return PassResult(gm, False)
        for node in list(gm.graph.nodes):  # each branch's joint takes its first argument's place again
            if roles.role_of(node) in roles.JOINTS:
                node.replace_all_uses_with(node.args[0])
        site_nodes, single = SiteNodes(gm), _single_readers(gm)
        with torch.no_grad():
            for (path, kind), specs in by_site.items():
                if any(hasattr(spec.module, "for_weight") for spec in specs):  # MultiheadAttention: two weights
                    _fold_projections(gm, path, kind, site_nodes(path, kind), specs, weights, merged)
                    continue
                base = site_nodes(path, kind)[0]
                _, weight_node, bias_node = site_args(base, kind)
                if base.target in QUANTIZED_OPS:
                    _fold_quantized(gm, site_nodes(path, kind), specs, weights, quantized, merged)
                    continue
                weight = attribute(gm, weight_node.target)
                bias = attribute(gm, bias_node.target) if bias_node is not None and bias_node.op == "get_attr" else None
                if (path, kind) not in merged:
                    merged[(path, kind)] = _merged_site(specs, weight, bias, kind, weights)
                new_weight, new_bias = merged[(path, kind)]
                # A tied weight (GPT-2's wte and lm_head read one tensor): most methods adapt this site
                # only, so it gets its own weight; a method whose change the tied readers see
                # (trainable tokens) writes into the shared weight.
                follows = [getattr(spec.module, "follows_ties", False) for spec in specs]
                tied = _used_elsewhere(gm, weight_node, base, single)
                if tied and any(follows) and not all(follows):
                    raise FoldError(
                        f"cannot fold {path}: its weight is tied, and some of its adapters change the tied readers "
                        "while others do not",
                        hint="fold such adapters separately, or untie the weights first",
                    )
                targets = [weight_node.target]
                if tied and all(follows):
                    targets = _targets_of(gm, weight)
                elif tied:
                    single.pop(id(weight), None)
                    weight_node = _own_attribute(gm, base, weight_node, f"{path}.surgeon_folded_weight")
                    targets = [weight_node.target]
                _set(gm, targets, new_weight)
                if bias is not None and new_bias is not None:
                    _set(gm, [bias_node.target], new_bias)
        for node in reversed(list(gm.graph.nodes)):
            if roles.META in node.meta and not node.users:
                gm.graph.erase_node(node)
        if GATES_BUFFER in gm._buffers:
            del gm._buffers[GATES_BUFFER]
        for spec in insertions:  # the adapter parameters leave the folded module
            owner = gm.get_submodule(spec.path)
            prefix = attribute_prefix(spec.adapter)
            for name in [n for n in list(owner._parameters) + list(owner._buffers) if n.startswith(prefix)]:
                delattr(owner, name)
        return PassResult(gm, True)

    return fold_adapter_branches


def _merged_site(specs, weight, bias, kind: str, weights: dict) -> tuple:
    """(weight, bias) of one site with its adapters folded, as new frozen parameters in the base tensors' dtypes."""
    wide = merge_dtype(weight.dtype)
    new_weight, new_bias = weight.detach().to(wide), None if bias is None else bias.detach().to(wide)
    for spec in specs:
        new_weight, new_bias = fold_weighted(spec, new_weight, new_bias, kind, weights.get(spec.adapter, 1.0))
    frozen = lambda value, like: torch.nn.Parameter(value.to(like.dtype), requires_grad=False)  # noqa: E731
    return frozen(new_weight, weight), None if bias is None or new_bias is None else frozen(new_bias, bias)


def _fold_projections(gm, path: str, kind: str, nodes, specs, weights: dict, merged: dict) -> None:
    """A site whose calls read several weights (MultiheadAttention: in_proj_weight, then out_proj.weight), each
    folded with its own projection of every adapter (``module.for_weight``: a method's adapter for a site of
    several weights). ``merged`` keeps the first weight under (path, kind), as any site's, and each other under
    (path, kind, its parameter name); biases are left as they are (these adapters have none)."""
    if not all(hasattr(spec.module, "for_weight") for spec in specs):
        raise FoldError(f"cannot fold {path}: it has adapters of several projections and of one weight together",
                        hint="this is a bug in surgeon: planning gives a site of several weights adapters of one method")
    targets = list(dict.fromkeys(site_args(node, kind)[1].target for node in nodes))
    for i, target in enumerate(targets):
        key = (path, kind) if i == 0 else (path, kind, target)
        if key not in merged:
            parts = [replace(spec, module=spec.module.for_weight(target[len(path) + 1:])) for spec in specs]
            merged[key] = (_merged_site(parts, attribute(gm, target), None, kind, weights)[0], None)
        _set(gm, [target], merged[key][0])


def _fold_quantized(gm, nodes, specs, weights: dict, quantized: str, merged: dict) -> None:
    """Every call (``nodes``) of a quantized site: merged in float32 from the dequantized weight, then made a plain
    linear or quantized again (kernels/quantized.py). Biases of adapters are refused at planning on such sites."""
    path = specs[0].path
    if (path, "linear") not in merged:
        weight = graph_weight(gm, nodes[0])
        for spec in specs:
            weight, bias = fold_weighted(spec, weight, None, "linear", weights.get(spec.adapter, 1.0))
            if bias is not None:
                raise FoldError(f"cannot fold {path}: an adapter with a bias on a quantized linear", hint="adapt quantized linears without a bias of the adapter")
        merged[(path, "linear")] = ("quantized", weight)
    weight = merged[(path, "linear")][1]
    (dequantize_graph_site if quantized == "dequantize" else requantize_graph_site)(gm, nodes, weight)


def fold_weighted(spec, weight, bias, kind: str, w: float):
    """One adapter folded with strength w: W + w (fold(W) - W), exact at w = 1, nothing at w = 0."""
    if w == 0:
        return weight, bias
    folded, folded_bias = spec.module.fold(weight, bias, kind)
    if w == 1:
        return folded, folded_bias
    weight = weight + w * (folded - weight)
    if folded_bias is not None:
        bias = folded_bias if bias is None else bias + w * (folded_bias - bias)
    return weight, bias


def _set(gm, targets: list, new) -> None:
    """Give every attribute in ``targets`` (one tensor, or a tied group) the parameter ``new`` (one object, so tied
    attributes stay tied)."""
    for target in targets:
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        setattr(owner, name, new)


def _targets_of(gm, tensor) -> list:
    """Every get_attr target of the graph that holds ``tensor``."""
    return list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr" and attribute(gm, n.target) is tensor))


def _single_readers(gm) -> dict:
    """id(tensor) -> its get_attr node, for the tensors exactly one get_attr node reads (most weights)."""
    readers: dict = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            tensor = attribute(gm, node.target)
            readers[id(tensor)] = node if id(tensor) not in readers else None
    return {k: v for k, v in readers.items() if v is not None}


def _used_elsewhere(gm, weight_node, base, single: dict | None = None) -> bool:
    """Does any op other than this site's base op (and its adapter nodes) read this weight?

    ``single`` (from _single_readers) spares the walk over the graph for a weight only ``weight_node`` reads."""
    tensor = attribute(gm, weight_node.target)
    if single is not None and single.get(id(tensor)) is weight_node:
        return any(user is not base and roles.META not in user.meta for user in weight_node.users)
    for node in gm.graph.nodes:
        if node.op != "get_attr" or attribute(gm, node.target) is not tensor:
            continue
        for user in node.users:
            if user is not base and roles.META not in user.meta:
                return True
    return False


def _own_attribute(gm, base, weight_node, target: str):
    """A new get_attr node for ``base``'s weight under ``target``, holding the same tensor for now."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if _has_module(gm, owner_path) else _make_module(gm, owner_path)
    setattr(owner, name, attribute(gm, weight_node.target))
    with gm.graph.inserting_before(base):
        node = gm.graph.get_attr(target)
    base.replace_input_with(weight_node, node)
    return node


def _has_module(gm, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _make_module(gm, path: str):
    owner = gm
    for part in path.split("."):
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    return owner


def output_difference(expected, got) -> tuple:
    """(max, mean) absolute difference of the largest floating-point output (the logits, not the loss)."""
    pairs = [(e, g) for e, g in zip(tree_leaves(expected), tree_leaves(got)) if isinstance(e, torch.Tensor) and e.is_floating_point()]
    if not pairs:
        return 0.0, 0.0
    e, g = max(pairs, key=lambda pair: pair[0].numel())
    diff = (e.double() - g.double()).abs()
    return diff.max().item(), diff.mean().item()


def verify_fold(unfolded, folded, args: tuple, kwargs: dict, tolerance: tuple | None = None) -> float:
    """Run both graphs on the same inputs; raise FoldError beyond tolerance (by dtype, or ``tolerance``:
    (rtol, atol)). Returns the max abs difference."""
    with torch.no_grad():
        expected = [t for t in tree_leaves(unfolded(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        got = [t for t in tree_leaves(folded(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for e, g in zip(expected, got):
        if not e.is_floating_point():
            continue
        rtol, atol = tolerance or TOLERANCES.get(str(e.dtype).replace("torch.", ""), (1e-4, 1e-5))
        scale = max(1.0, e.detach().abs().max().item())
        wide = merge_dtype(torch.promote_types(e.dtype, g.dtype))
        diff = (e.to(wide) - g.to(wide)).abs()
        worst = max(worst, diff.max().item())
        if not torch.all(diff <= atol * scale + rtol * e.to(wide).abs()):
            raise FoldError(
                f"folding changed the outputs: max abs difference {diff.max().item():.3g} "
                f"(tolerance {atol * scale:.3g} + {rtol:g} x |output| for {e.dtype})",
                hint="this is a bug in surgeon, or a pass that changed the adapter graph; fold(verify=False) skips the check",
            )
    return worst
