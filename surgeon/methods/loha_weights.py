"""LoHa on a site (torch; loha.py holds the config and the math)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.checkpoints.peft_format import lora_family_config, lora_family_rules, refuse

from .adapter import SiteAdapter, site_adapter

__all__ = ["LohaWeights"]


@site_adapter("loha")
class LohaWeights(SiteAdapter):
    peft_type = "LOHA"
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
        dtype = self.hada_w1_a.dtype
        w1 = graph.call(aten.mm.default, (graph.param("hada_w1_a"), graph.param("hada_w1_b")), "w1")
        w2 = graph.call(aten.mm.default, (graph.param("hada_w2_a"), graph.param("hada_w2_b")), "w2")
        delta = graph.call(aten.mul.Tensor, (graph.call(aten.mul.Tensor, (w1, w2), "delta"), self.scale), "delta")
        d = graph.call(aten.linear.default, (graph.cast(x, dtype), delta), "expand")
        return None, graph.call(aten.add.Tensor, (y, graph.cast(d, graph.dtype_of(graph.base), dtype)), "out")

    def fold(self, weight, bias, kind: str):
        return weight + self.delta(torch.float32), bias

    def eager(self, module, x, y):
        return y + F.linear(x.to(self.hada_w1_a.dtype), self.delta(self.hada_w1_a.dtype)).to(y.dtype)

    def peft_state(self) -> dict:
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}

    @classmethod
    def peft_config(cls, sites) -> dict:
        fields = lora_family_config(sites)
        del fields["use_rslora"]
        return dict(fields, rank_dropout=0.0, module_dropout=0.0, init_weights=True)

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:
        refuse(config, "rank_dropout", "module_dropout")
        return lora_family_rules(config, "loha", alpha_key="alpha")
