"""What LoHa and LoKr share (the LyCORIS family): a branch that builds the full update dW, and PEFT's
training-time dropouts on it.

PEFT draws them in this order: first u ~ U(0,1) for the module (the adapter acts when u > p, the
``module_dropout``), then one u per output row (the row is kept when u_i > p, the ``rank_dropout``;
divided by the kept share with ``rescale``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from surgeon.methods import node_roles as roles

__all__ = ["delta_branch", "module_kept", "rows_dropped", "eager_dropped"]


def delta_branch(adapter, graph, x, y, delta, rescale: bool):
    """``y + x dW^T`` for a method that builds the full dW (``delta()`` adds its nodes), with the
    LyCORIS dropouts in training (the module's draw first, as PEFT) and the adapter's gate."""
    aten = torch.ops.aten
    like = next(adapter.parameters())
    keep = module_kept(graph, adapter.config, like)
    dw = rows_dropped(graph, delta(), adapter.config.rank_dropout, rescale, adapter.out_features, like)
    d = graph.call(aten.linear.default, (graph.cast(x, like.dtype), dw), roles.EXPAND)
    if keep is not None:
        d = graph.call(aten.mul.Tensor, (d, keep), roles.MODULE_DROPOUT)
    if graph.gate() is not None:
        d = graph.call(aten.mul.Tensor, (d, graph.gate()), roles.GATE)
    return None, graph.call(aten.add.Tensor, (y, graph.cast(d, graph.dtype_of(graph.base), like.dtype)), roles.OUT)


def module_kept(graph, config, like):
    """A 0/1 tensor: does the adapter act in this training step? None when it always does.

    PEFT draws u for the module in every training step, even with p = 0; so
    does this when any dropout is set, so that the rank draws that follow match.
    """
    p = config.module_dropout
    if not graph.training or not (p or config.rank_dropout):
        return None
    aten = torch.ops.aten
    u = graph.call(aten.rand.default, ([1],), roles.MODULE_DROPOUT, {"dtype": torch.float32, "device": like.device})
    if not p:
        return None
    return graph.call(aten._to_copy.default, (graph.call(aten.gt.Scalar, (u, p), roles.MODULE_DROPOUT),), roles.MODULE_DROPOUT, {"dtype": like.dtype})


def rows_dropped(graph, delta, p: float, rescale: bool, rows: int, like):
    """delta with each row kept when u_i > p (divided by the kept share with ``rescale``); delta itself outside training."""
    if not graph.training or not p:
        return delta
    aten = torch.ops.aten
    u = graph.call(aten.rand.default, ([rows],), roles.RANK_DROPOUT, {"dtype": torch.float32, "device": like.device})
    mask = graph.call(aten._to_copy.default, (graph.call(aten.gt.Scalar, (u, p), roles.RANK_DROPOUT),), roles.RANK_DROPOUT, {"dtype": like.dtype})
    if rescale:  # an all-dropped mask stays zero instead of PEFT's 0/0
        share = graph.call(aten.clamp_min.default, (graph.call(aten.mean.default, (mask,), roles.RANK_DROPOUT), 1e-12), roles.RANK_DROPOUT)
        mask = graph.call(aten.div.Tensor, (mask, share), roles.RANK_DROPOUT)
    mask = graph.call(aten.view.default, (mask, [-1, 1]), roles.RANK_DROPOUT)
    return graph.call(aten.mul.Tensor, (delta, mask), roles.RANK_DROPOUT)


def eager_dropped(adapter, module, x, rescale: bool):
    """x dW^T with the same dropouts, eagerly (forward hooks)."""
    config, dtype = adapter.config, next(adapter.parameters()).dtype
    training = module.training
    if training and (config.module_dropout or config.rank_dropout) and not bool(torch.rand(1) > config.module_dropout):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    delta = adapter.delta(dtype)
    if training and config.rank_dropout:
        mask = (torch.rand(delta.shape[0]) > config.rank_dropout).to(dtype=dtype, device=delta.device)
        if rescale:
            mask = mask / mask.mean().clamp_min(1e-12)
        delta = delta * mask.view(-1, 1)
    return F.linear(x.to(dtype), delta).to(x.dtype)


