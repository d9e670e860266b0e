"""LoKr on a site (torch; lokr.py holds the config, the shapes and the math)."""

from __future__ import annotations

import math

import torch
from torch import nn

from surgeon.methods.peft_format import AdapterError, lora_family_config, lora_family_rules, refuse

from surgeon.methods.adapter import SiteAdapter, site_adapter
from surgeon.methods.loha_weights import delta_branch, dropout_arguments, eager_dropped, one_per_adapter
from surgeon.methods.lokr import lokr_shapes

__all__ = ["LokrWeights"]


@site_adapter("lokr")
class LokrWeights(SiteAdapter):
    peft_type = "LOKR"
    applies_gate = True
    peft_required = ("r", "alpha", "target_modules")

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
            return graph.call(aten.mm.default, (graph.param(f"{name}_a"), graph.param(f"{name}_b")), "factor")

        def delta():
            kron = graph.call(aten.kron.default, (factor("lokr_w1"), factor("lokr_w2")), "delta")
            return graph.call(aten.mul.Tensor, (kron, self.scale), "delta")

        return delta_branch(self, graph, x, y, delta, rescale=self.config.rank_dropout_scale)

    def fold(self, weight, bias, kind: str):
        return weight + self.delta(weight.dtype), bias

    def eager(self, module, x, y):
        return y + eager_dropped(self, module, x, self.config.rank_dropout_scale)

    def peft_state(self) -> dict:
        return dict(self.named_parameters(recurse=False))

    @classmethod
    def peft_config(cls, sites) -> dict:
        shapes = {(s.config.factor, s.config.decompose_both) for s in sites}
        if len(shapes) > 1:
            raise AdapterError(f"adapter '{sites[0].adapter}' mixes LoKr factor/decompose_both settings, which PEFT holds once per adapter")
        factor, decompose_both = shapes.pop()
        fields = lora_family_config(sites)
        del fields["use_rslora"]
        dropouts = one_per_adapter(sites, "rank_dropout", "module_dropout", "rank_dropout_scale")
        return dict(fields, decompose_both=decompose_both, decompose_factor=factor or -1, **dropouts, init_weights=True)

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:
        refuse(config, "use_effective_conv2d")
        factor = config.get("decompose_factor", -1)
        extra = ([("factor", factor)] if factor and factor > 0 else []) + ([("decompose_both", True)] if config.get("decompose_both") else [])
        extra += dropout_arguments(config, "rank_dropout", "module_dropout")
        extra += [("rank_dropout_scale", True)] if config.get("rank_dropout_scale") else []
        return lora_family_rules(config, "lokr", alpha_key="alpha", extra=extra)
