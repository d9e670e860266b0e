"""(IA)^3 on a site (torch; config.py holds the config and the math).

The vector is stored as PEFT stores ``ia3_l``: (out, 1), or (1, in) for a
feed-forward site.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter
from surgeon.methods.ia3.config import Ia3Config
from surgeon.methods.ia3.peft import Ia3Peft

__all__ = ["Ia3Weights"]


class Ia3Weights(SiteAdapter):
    method = Ia3Config.method_name
    peft_format = Ia3Peft

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        shape = (1, in_features) if config.feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        dtype = graph.dtype_of(x if self.config.feedforward else graph.base)
        vector = graph.call_before(aten.view.default, (graph.cast_before(graph.param("ia3_l"), dtype), [-1]), roles.VECTOR)
        if self.config.feedforward:
            return graph.call_before(aten.mul.Tensor, (x, vector), roles.IN), None
        return None, graph.call(aten.mul.Tensor, (y, vector), roles.OUT)

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
