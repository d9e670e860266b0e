"""LoHa on a site (torch; config.py holds the config and the math)."""

from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.methods import node_roles as roles
from surgeon.methods._lycoris import delta_branch, eager_dropped
from surgeon.methods.adapter import SiteAdapter
from surgeon.methods.loha.config import LohaConfig
from surgeon.methods.loha.peft import LohaPeft

__all__ = ["LohaWeights"]

W1, W2 = "w1", "w2"  # the roles of the two Hadamard factors' products


class LohaWeights(SiteAdapter):
    method = LohaConfig.method_name
    peft_format = LohaPeft
    applies_gate = True

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
            w1 = graph.call(aten.mm.default, (graph.param("hada_w1_a"), graph.param("hada_w1_b")), W1)
            w2 = graph.call(aten.mm.default, (graph.param("hada_w2_a"), graph.param("hada_w2_b")), W2)
            return graph.call(aten.mul.Tensor, (graph.call(aten.mul.Tensor, (w1, w2), roles.DELTA), self.scale), roles.DELTA)

        return delta_branch(self, graph, x, y, delta, rescale=True)

    def fold(self, weight, bias, kind: str):
        return weight + self.delta(weight.dtype), bias

    def eager(self, module, x, y):
        return y + eager_dropped(self, module, x, True)

    def peft_state(self) -> dict:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
