"""LoKr on a site (torch; config.py holds the config, the shapes and the math)."""

from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.methods import node_roles as roles
from surgeon.methods._lycoris import delta_branch, eager_dropped
from surgeon.methods.adapter import SiteAdapter
from surgeon.methods.lokr.config import LokrConfig, lokr_shapes
from surgeon.methods.lokr.peft import LokrPeft

__all__ = ["LokrWeights"]


class LokrWeights(SiteAdapter):
    method = LokrConfig.method_name
    peft_format = LokrPeft
    applies_gate = True

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        for name, shape in lokr_shapes(config, in_features, out_features).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device)))
        with torch.no_grad():  # PEFT's init: W1 (or W1a) zero, the rest kaiming-uniform
            for name, p in self.named_parameters(recurse=False):
                if name in ("lokr_w1", "lokr_w1_a"):
                    p.zero_()
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.config.scale

    def _factor(self, name: str, dtype):
        if name in self._parameters:
            return self._parameters[name].to(dtype)
        return self._parameters[f"{name}_a"].to(dtype) @ self._parameters[f"{name}_b"].to(dtype)

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """dW = kron(W1, W2) * s, (out, in)."""
        return torch.kron(self._factor("lokr_w1", dtype), self._factor("lokr_w2", dtype)) * self.scale

    def branch(self, graph, x, y):
        aten = torch.ops.aten

        def factor(name):
            if name in self._parameters:
                return graph.param(name)
            return graph.call(aten.mm.default, (graph.param(f"{name}_a"), graph.param(f"{name}_b")), roles.FACTOR)

        def delta():
            kron = graph.call(aten.kron.default, (factor("lokr_w1"), factor("lokr_w2")), roles.DELTA)
            return graph.call(aten.mul.Tensor, (kron, self.scale), roles.DELTA)

        return delta_branch(self, graph, x, y, delta, rescale=self.config.rank_dropout_scale)

    def fold(self, weight, bias, kind: str):
        return weight + self.delta(weight.dtype), bias

    def eager(self, module, x, y):
        return y + eager_dropped(self, module, x, self.config.rank_dropout_scale)

    def peft_state(self) -> dict:
        return dict(self.named_parameters(recurse=False))
