"""The LoRA fold pass: merge every adapter into its base weight and remove its nodes.

    W' = W + sum_adapters scale * B @ A          (linear: W is (out, in))
    W' = W + sum_adapters (scale * B @ A)^T      (GPT-2 Conv1D: W is (in, out))
    b' = b + scale * b_B                         (adapters with a bias)

The sum is computed in float32 and rounded once to the weight's dtype. The
folded graph has exactly the base graph's op sequence. By default the new
weights are new tensors set on the graph module (the user's model and the
unfolded graph keep theirs); ``inplace=True`` writes them into the existing
tensors and keeps the originals so that :func:`unfold_inplace` restores them
bit for bit.

:func:`verify_fold` runs the folded and unfolded graphs on the same inputs and
raises :class:`FoldError` when they differ beyond a tolerance for the dtype.
"""

from __future__ import annotations

from surgeon.grammar.diagnostics import SurgeryError

from ._graph import adapter_nodes
from .pipeline import PassResult

__all__ = ["fold_lora", "unfold_inplace", "verify_fold", "FoldError", "copy_graph_module", "TOLERANCES"]

# (rtol, atol relative to the output's largest magnitude) by dtype of the outputs.
TOLERANCES = {"float32": (1e-4, 1e-5), "float64": (1e-9, 1e-10), "bfloat16": (2e-2, 2e-2), "float16": (5e-3, 5e-3)}


class FoldError(SurgeryError):
    """Folding changed what the model computes, or cannot be done."""


def copy_graph_module(gm):
    """A new graph module with its own graph and module tree, sharing gm's tensors."""
    import copy
    import warnings

    import torch

    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated copy path
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _base_and_weight(out_node):
    """Follow an adapter's 'out' node back to the base op; return it, its weight and bias get_attr nodes."""
    import torch

    base = out_node.args[0]
    while "surgeon" in base.meta:
        base = base.args[0]
    if base.target is torch.ops.aten.addmm.default:  # GPT-2 Conv1D: addmm(b, x, W(in, out))
        return base, base.args[2], base.args[0], True
    bias = base.args[2] if len(base.args) > 2 else None
    return base, base.args[1], bias, False


def fold_lora(*, inplace: bool = False, originals: dict | None = None):
    """A pass that folds every LoRA branch. With ``inplace``, ``originals`` receives weight -> original copy."""

    def fold_lora_adapters(gm) -> PassResult:
        import torch

        outs = adapter_nodes(gm, role="out")
        if not outs:
            return PassResult(gm, False)
        deltas: dict = {}  # weight target -> (weight node, bias node, transposed, delta, bias delta)
        for out in outs:
            record = out.meta["surgeon"]
            _, weight_node, bias_node, transposed = _base_and_weight(out)
            chain = {n.meta["surgeon"]["role"]: n for n in adapter_nodes(gm, site=record["site"], adapter=record["adapter"])}
            a = gm.get_parameter(chain["lora_A"].target)
            b = gm.get_parameter(chain["lora_B"].target)
            scale = chain["scale"].args[1]
            delta = (b.detach().float() @ a.detach().float()) * scale
            entry = deltas.setdefault(weight_node.target, [weight_node, bias_node, transposed, 0, 0])
            entry[3] = entry[3] + (delta.T if transposed else delta)
            if "lora_B_bias" in chain:
                if bias_node is None:
                    raise FoldError(f"cannot fold the bias of adapter '{record['adapter']}' into {record['site']}: it has no bias")
                entry[4] = entry[4] + gm.get_parameter(chain["lora_B_bias"].target).detach().float() * scale
        with torch.no_grad():
            for target, (_, bias_node, _, delta, bias_delta) in deltas.items():
                _merge(gm, target, delta, inplace, originals)
                if bias_node is not None and not isinstance(bias_delta, int):
                    _merge(gm, bias_node.target, bias_delta, inplace, originals)
        for out in outs:
            out.replace_all_uses_with(out.args[0])
        for node in reversed(list(gm.graph.nodes)):
            if "surgeon" in node.meta and not node.users:
                gm.graph.erase_node(node)
        for out in outs:  # the adapter parameters leave the folded module
            record = out.meta["surgeon"]
            owner = gm.get_submodule(record["site"])
            for name in [n for n, _ in owner.named_parameters(recurse=False) if n.startswith("surgeon_lora_")]:
                delattr(owner, name)
        return PassResult(gm, True)

    return fold_lora_adapters


def _merge(gm, target: str, delta, inplace: bool, originals: dict | None) -> None:
    import torch

    weight = gm.get_parameter(target) if _is_param(gm, target) else _attr(gm, target)
    merged = (weight.detach().float() + delta).to(weight.dtype)
    if inplace:
        if originals is not None and target not in originals:
            originals[target] = (weight, weight.detach().clone())
        weight.data.copy_(merged)
        return
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    setattr(owner, name, torch.nn.Parameter(merged, requires_grad=False))


def _is_param(gm, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def unfold_inplace(originals: dict) -> None:
    """Restore the weights an in-place fold changed, bit for bit."""
    import torch

    with torch.no_grad():
        for weight, saved in originals.values():
            weight.data.copy_(saved)
    originals.clear()


def verify_fold(unfolded, folded, args: tuple, kwargs: dict) -> float:
    """Run both graphs on the same inputs; raise FoldError beyond tolerance. Returns the max abs difference."""
    import torch
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        expected = [t for t in tree_leaves(unfolded(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        got = [t for t in tree_leaves(folded(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    worst = 0.0
    for e, g in zip(expected, got):
        if not e.is_floating_point():
            continue
        rtol, atol = TOLERANCES.get(str(e.dtype).replace("torch.", ""), (1e-4, 1e-5))
        scale = max(1.0, e.detach().abs().max().item())
        diff = (e.float() - g.float()).abs()
        worst = max(worst, diff.max().item())
        if not torch.all(diff <= atol * scale + rtol * e.float().abs()):
            raise FoldError(
                f"folding changed the outputs: max abs difference {diff.max().item():.3g} "
                f"(tolerance {atol * scale:.3g} + {rtol:g} x |output| for {e.dtype})",
                hint="this is a bug in surgeon, or a pass that changed the adapter graph; fold(verify=False) skips the check",
            )
    return worst
