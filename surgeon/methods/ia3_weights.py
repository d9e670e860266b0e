"""(IA)^3 on a site (torch; ia3.py holds the config and the math).

The vector is stored as PEFT stores ``ia3_l``: (out, 1), or (1, in) for a
feed-forward site.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.methods.peft_format import call_rule, peft_targets

from surgeon.methods.adapter import SiteAdapter, site_adapter

__all__ = ["Ia3Weights"]


@site_adapter("ia3")
class Ia3Weights(SiteAdapter):
    peft_type = "IA3"
    peft_required = ("target_modules",)

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        shape = (1, in_features) if config.feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        dtype = graph.dtype_of(x if self.config.feedforward else graph.base)
        vector = graph.call_before(aten.view.default, (graph.cast_before(graph.param("ia3_l"), dtype), [-1]), "vector")
        if self.config.feedforward:
            return graph.call_before(aten.mul.Tensor, (x, vector), "in"), None
        return None, graph.call(aten.mul.Tensor, (y, vector), "out")

    def fold(self, weight, bias, kind: str):
        vector = self.ia3_l.detach().to(weight.dtype).flatten()
        if self.config.feedforward:  # columns of the (out, in) weight: rows when stored (in, out)
            weight = weight * (vector.unsqueeze(1) if kind == "hf_conv1d" else vector)
            return weight, bias
        weight = weight * (vector if kind == "hf_conv1d" else vector.unsqueeze(1))
        return weight, (None if bias is None else bias * vector)

    def eager(self, module, x, y):
        return y * self.ia3_l.flatten().to(y.dtype)

    def hook(self):
        vector = self.ia3_l
        if not self.config.feedforward:
            return super().hook()

        def pre_hook(module, args):
            return (args[0] * vector.flatten().to(args[0].dtype),) + tuple(args[1:])

        pre_hook.is_pre_hook = True
        return pre_hook

    def peft_state(self) -> dict:
        return {"ia3_l": self.ia3_l}

    @classmethod
    def peft_config(cls, sites) -> dict:
        return dict(
            target_modules=[s.path for s in sites],
            feedforward_modules=[s.path for s in sites if s.config.feedforward],
            fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
            init_ia3_weights=True,
        )

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:
        rules = []
        for key, arguments in (("target_modules", []), ("feedforward_modules", [("feedforward", True)])):
            selectors = peft_targets(config.get(key))
            if selectors:  # feed-forward sites: the later rule wins
                rules.append(call_rule(selectors, "ia3", arguments))
        return rules
