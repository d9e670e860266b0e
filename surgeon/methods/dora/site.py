"""DoRA on a site (torch; config.py holds the config and the math).

Forward, as PEFT's ``DoraLinearLayer`` (n = ||W + s B A||_row, detached; the
graph computes it factored, without the (out, in) matrix B A: see _factored_norm)::

    y' = y + (m / n - 1) * (x W^T) + (m / n) * s * (dropout(x) A^T B^T)

where ``x W^T`` is the base output less its bias (or, with dropout in training,
the base weight applied to the dropped-out input, as PEFT does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter
from surgeon.methods.dora.config import DoraConfig
from surgeon.methods.dora.peft import DoraPeft
from surgeon.methods.lora.site import LoraWeights

__all__ = ["DoraWeights", "CHANGE"]

CHANGE = "dora"  # the role of the nodes computing DoRA's change of the output (lowering.py reads them)


class DoraWeights(LoraWeights):
    method = DoraConfig.method_name
    peft_format = DoraPeft
    adapts_quantized = False  # its norm reads the base weight

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features, dtype=dtype, device=device)
        if weight is None:
            raise ValueError("DoRA needs the base weight to start its magnitude at ||W||")
        with torch.no_grad():
            self.lora_magnitude_vector = nn.Parameter(self._rows(weight.detach().to(dtype)).norm(dim=1))

    @classmethod
    def validate_site(cls, site, context) -> list:
        """Nothing of LoRA's inits or grouped convolutions applies: DoRA adapts linear layers, from kaiming."""
        return []

    def low_rank_refusal(self) -> str | None:
        return SiteAdapter.low_rank_refusal(self)  # m / ||W + s B A|| rescales the rows: not one product s B A

    def _rows(self, weight):
        """The weight as (out, in) whatever its storage (GPT-2's Conv1D stores (in, out))."""
        return weight.T if self.kind == "hf_conv1d" else weight

    def norm(self, weight) -> torch.Tensor:
        """||W + s B A||_row, as a constant."""
        with torch.no_grad():
            return (self._rows(weight.to(self.lora_A.dtype)) + self.delta(self.lora_A.dtype)).norm(dim=1)

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        dtype = self.lora_A.dtype
        a, b, m = graph.param("lora_A"), graph.param("lora_B"), graph.param("lora_magnitude_vector")
        weight = graph.cast(graph.weight(), dtype)
        rows = graph.call(aten.t.default, (weight,), roles.ROWS) if self.kind == "hf_conv1d" else weight
        norm = self._factored_norm(graph, rows, a, b)
        factor = graph.call(aten.div.Tensor, (m, norm), roles.FACTOR)
        x_in = graph.cast(x, dtype)
        if graph.training and self.config.dropout > 0:
            x_in = graph.call(aten.dropout.default, (x_in, self.config.dropout, True), roles.DROPOUT)
            base = graph.call(aten.linear.default, (x_in, rows), roles.BASE)
        else:
            base = graph.cast(graph.base, dtype)
            bias = graph.bias()
            if bias is not None:
                base = graph.call(aten.sub.Tensor, (base, graph.cast(bias, dtype)), roles.BASE)
        lora = graph.call(aten.linear.default, (graph.call(aten.linear.default, (x_in, a), roles.SHRINK), b), roles.EXPAND)
        scaled = graph.call(aten.mul.Tensor, (graph.call(aten.mul.Tensor, (factor, lora), CHANGE), self.scale), CHANGE)
        change = graph.call(aten.add.Tensor, (graph.call(aten.mul.Tensor, (graph.call(aten.sub.Tensor, (factor, 1), CHANGE), base), CHANGE), scaled), CHANGE)
        if graph.gate() is not None:
            change = graph.call(aten.mul.Tensor, (change, graph.gate()), roles.GATE)
        return None, graph.call(aten.add.Tensor, (y, graph.cast(change, graph.dtype_of(graph.base), dtype)), roles.OUT)

    def _factored_norm(self, graph, rows, a, b):
        """||W + s B A||_row without the (out, in) matrix B A: sqrt(||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B>).

        Two skinny products, (out, r) and (r, r), instead of two (out, in)
        temporaries per forward; detached, as PEFT detaches the norm.
        """
        aten, s = torch.ops.aten, self.scale
        a, b = (graph.call(aten.detach.default, (p,), roles.NORM) for p in (a, b))
        a_t = graph.call(aten.t.default, (a,), roles.NORM)
        wa = graph.call(aten.mm.default, (rows, a_t), roles.NORM)  # (out, r)
        baa = graph.call(aten.mm.default, (b, graph.call(aten.mm.default, (a, a_t), roles.NORM)), roles.NORM)  # B (A A^T)
        w_sq = graph.call(aten.sum.dim_IntList, (graph.call(aten.mul.Tensor, (rows, rows), roles.NORM), [1]), roles.NORM)
        cross = graph.call(aten.sum.dim_IntList, (graph.call(aten.mul.Tensor, (b, wa), roles.NORM), [1]), roles.NORM)
        ba_sq = graph.call(aten.sum.dim_IntList, (graph.call(aten.mul.Tensor, (baa, b), roles.NORM), [1]), roles.NORM)
        total = graph.call(aten.add.Tensor, (w_sq, graph.call(aten.mul.Tensor, (cross, 2 * s), roles.NORM)), roles.NORM)
        total = graph.call(aten.add.Tensor, (total, graph.call(aten.mul.Tensor, (ba_sq, s * s), roles.NORM)), roles.NORM)
        return graph.call(aten.detach.default, (graph.call(aten.sqrt.default, (total,), roles.NORM),), roles.NORM)

    def fold(self, weight, bias, kind: str):
        rows = self._rows(weight) + self.delta(weight.dtype)
        merged = (self.lora_magnitude_vector.to(weight.dtype) / rows.norm(dim=1)).unsqueeze(1) * rows
        return (merged.T if kind == "hf_conv1d" else merged), bias

    def eager(self, module, x, y):
        dtype = self.lora_A.dtype
        factor = self.lora_magnitude_vector / self.norm(module.weight)
        x_in = x.to(dtype)
        if module.training and self.config.dropout > 0:
            x_in = F.dropout(x_in, self.config.dropout, True)
            base = F.linear(x_in, self._rows(module.weight.to(dtype)))
        else:
            base = y.to(dtype) - (module.bias.to(dtype) if getattr(module, "bias", None) is not None else 0)
        lora = F.linear(F.linear(x_in, self.lora_A), self.lora_B)
        return y + ((factor - 1) * base + factor * lora * self.scale).to(y.dtype)

    def peft_state(self) -> dict:
        return {**super().peft_state(), "lora_magnitude_vector": self.lora_magnitude_vector}
