"""LoHa on a site (torch; loha.py holds the config and the math)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods.peft_format import AdapterError, lora_family_config, lora_family_rules, refuse

from surgeon.methods.adapter import SiteAdapter, site_adapter

__all__ = ["LohaWeights", "delta_branch", "module_kept", "rows_dropped", "eager_dropped", "one_per_adapter", "dropout_arguments"]


@site_adapter("loha")
class LohaWeights(SiteAdapter):
    peft_type = "LOHA"
    applies_gate = True
    peft_required = ("r", "alpha", "target_modules")

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        factory = {"dtype": dtype, "device": device}
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, config.r, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, config.r, **factory))
        self.hada_w2_b = nn.Parameter(torch.zeros(config.r, in_features, **factory))
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.config.scale

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """dW, (out, in)."""
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)
        w2 = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)
        return w1 * w2 * self.scale

    def branch(self, graph, x, y):
        aten = torch.ops.aten

        def delta():
            w1 = graph.call(aten.mm.default, (graph.param("hada_w1_a"), graph.param("hada_w1_b")), "w1")
            w2 = graph.call(aten.mm.default, (graph.param("hada_w2_a"), graph.param("hada_w2_b")), "w2")
            return graph.call(aten.mul.Tensor, (graph.call(aten.mul.Tensor, (w1, w2), "delta"), self.scale), "delta")

        return delta_branch(self, graph, x, y, delta, rescale=True)

    def fold(self, weight, bias, kind: str):
        return weight + self.delta(weight.dtype), bias

    def eager(self, module, x, y):
        return y + eager_dropped(self, module, x, True)

    def peft_state(self) -> dict:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    @classmethod
    def peft_config(cls, sites) -> dict:
        fields = lora_family_config(sites)
        del fields["use_rslora"]
        return dict(fields, **one_per_adapter(sites, "rank_dropout", "module_dropout"), init_weights=True)

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:
        refuse(config, "use_effective_conv2d")
        return lora_family_rules(config, "loha", alpha_key="alpha", extra=dropout_arguments(config, "rank_dropout", "module_dropout"))


# The LyCORIS family's training-time dropouts (LoHa and LoKr), as PEFT draws them: first
# u ~ U(0,1) for the module (the adapter acts when u > p), then one u per output row.


def delta_branch(adapter, graph, x, y, delta, rescale: bool):
    """``y + x dW^T`` for a method that builds the full dW (``delta()`` adds its nodes), with the
    LyCORIS dropouts in training (the module's draw first, as PEFT) and the adapter's gate."""
    aten = torch.ops.aten
    like = next(adapter.parameters())
    keep = module_kept(graph, adapter.config, like)
    dw = rows_dropped(graph, delta(), adapter.config.rank_dropout, rescale, adapter.out_features, like)
    d = graph.call(aten.linear.default, (graph.cast(x, like.dtype), dw), "expand")
    if keep is not None:
        d = graph.call(aten.mul.Tensor, (d, keep), "module_dropout")
    if graph.gate() is not None:
        d = graph.call(aten.mul.Tensor, (d, graph.gate()), "gate")
    return None, graph.call(aten.add.Tensor, (y, graph.cast(d, graph.dtype_of(graph.base), like.dtype)), "out")


def module_kept(graph, config, like):
    """A 0/1 tensor: does the adapter act in this training step? None when it always does.

    PEFT draws u for the module in every training step, even with p = 0; so
    does this when any dropout is set, so that the rank draws that follow match.
    """
    p = config.module_dropout
    if not graph.training or not (p or config.rank_dropout):
        return None
    aten = torch.ops.aten
    u = graph.call(aten.rand.default, ([1],), "module_dropout", {"dtype": torch.float32, "device": like.device})
    if not p:
        return None
    return graph.call(aten._to_copy.default, (graph.call(aten.gt.Scalar, (u, p), "module_dropout"),), "module_dropout", {"dtype": like.dtype})


def rows_dropped(graph, delta, p: float, rescale: bool, rows: int, like):
    """delta with each row kept when u_i > p (divided by the kept share with ``rescale``); delta itself outside training."""
    if not graph.training or not p:
        return delta
    aten = torch.ops.aten
    u = graph.call(aten.rand.default, ([rows],), "rank_dropout", {"dtype": torch.float32, "device": like.device})
    mask = graph.call(aten._to_copy.default, (graph.call(aten.gt.Scalar, (u, p), "rank_dropout"),), "rank_dropout", {"dtype": like.dtype})
    if rescale:  # an all-dropped mask stays zero instead of PEFT's 0/0
        share = graph.call(aten.clamp_min.default, (graph.call(aten.mean.default, (mask,), "rank_dropout"), 1e-12), "rank_dropout")
        mask = graph.call(aten.div.Tensor, (mask, share), "rank_dropout")
    mask = graph.call(aten.view.default, (mask, [-1, 1]), "rank_dropout")
    return graph.call(aten.mul.Tensor, (delta, mask), "rank_dropout")


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


def one_per_adapter(sites, *names) -> dict:
    """Config fields PEFT holds once per adapter: the sites must agree on them."""
    values = {}
    for name in names:
        seen = {getattr(s.config, name) for s in sites}
        if len(seen) > 1:
            raise AdapterError(
                f"adapter '{sites[0].adapter}' gives its sites different {name} values, which PEFT holds once per adapter",
                hint="give each setting its own adapter block to save them in PEFT's format",
            )
        values[name] = seen.pop()
    return values


def dropout_arguments(config: dict, *names) -> list:
    """``[("rank_dropout", 0.1), ...]``: the set fields of a PEFT config, as rule arguments."""
    return [(name, config[name]) for name in names if config.get(name)]
