"""Trainable tokens on an embedding site (torch; config.py holds the config and the math).

The graph rewrite replaces the weight the embedding reads, and every other
op reading the same tensor (a tied ``lm_head``), by
``index_copy(E, 0, idx, T)``; that node has role "weight", so folding puts E
back and writes the rows into E itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.diagnostics import PlanError, SurgeryError

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter, SiteProblem
from surgeon.methods.peft_format import PREFIX
from surgeon.methods.trainable_tokens.config import TrainableTokensConfig
from surgeon.methods.trainable_tokens.peft import TrainableTokensPeft

__all__ = ["TrainableTokensWeights"]


class TrainableTokensWeights(SiteAdapter):
    method = TrainableTokensConfig.method_name
    peft_format = TrainableTokensPeft
    follows_ties = True  # tied readers of the embedding see the new rows (PEFT keeps them tied)
    applies_gate = True
    replaces_weight = True  # the base op (and its tied readers) read index_copy(E, idx, T)
    replaces_weight_hint = f"list all the token ids in one {method} rule"
    unroutable = "its rows replace the embedding's for the whole batch"

    @classmethod
    def validate_site(cls, site, context) -> list:
        beyond = max(site.config.indices)
        if beyond < site.in_features:
            return []
        return [SiteProblem("token-range", f"trainable_tokens on {site.path}: token id {beyond} is outside the embedding's "
                            f"{site.in_features} rows", "list ids below the vocabulary size (resize the embedding first to add tokens)")]

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        if weight is None:
            raise ValueError("trainable tokens start from the embedding's own rows: the base weight is needed")
        indices = list(config.indices)
        if max(indices) >= in_features:  # validate_site refuses it at plan time; this guards adapters built by hand
            raise PlanError(
                f"trainable_tokens: token id {max(indices)} is outside the embedding's {in_features} rows",
                hint="list ids below the vocabulary size (resize the embedding first to add tokens)",
            )
        self.register_buffer("token_indices", torch.tensor(indices, dtype=torch.long, device=device))
        self.trainable_tokens_delta = nn.Parameter(weight.detach()[indices].to(dtype=dtype, device=device).clone())

    def merged(self, weight):
        """E with the listed rows replaced (in E's dtype)."""
        return weight.index_copy(0, self.token_indices.to(weight.device), self.trainable_tokens_delta.to(weight.dtype))

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        weight = graph.weight()
        rows = graph.cast_before(graph.param("trainable_tokens_delta"), graph.dtype_of(weight))
        indices = graph.param("token_indices")
        if graph.routed:
            raise SurgeryError(
                "trainable_tokens cannot be routed per batch row: the embedding's rows are shared by the batch",
                hint="switch it with set_active() instead of adapter_ids",
            )
        gate = graph.gate(0)
        if gate is not None:  # rows lerp from the base rows to T: exactly one or the other at gate 0 and 1
            base_rows = graph.call_before(aten.index_select.default, (weight, 0, indices), roles.GATE)
            gate = graph.call_before(aten._to_copy.default, (gate,), roles.GATE, {"dtype": graph.dtype_of(weight)})
            rows = graph.call_before(aten.lerp.Tensor, (base_rows, rows, gate), roles.GATE)
        merged = graph.call_before(aten.index_copy.default, (weight, 0, indices, rows), roles.WEIGHT)
        graph.replace_weight(merged, tied=True)
        return None, None

    def fold(self, weight, bias, kind: str):
        return self.merged(weight), bias

    def eager(self, module, x, y):
        weight = self.merged(module.weight)
        if isinstance(module, nn.Embedding):
            return F.embedding(x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq)
        return F.linear(x, weight)  # a tied output layer (PEFT drops its bias too)

    def peft_state(self) -> dict:
        return {"trainable_tokens_delta": self.trainable_tokens_delta}

    @classmethod
    def peft_shared_state(cls, modules) -> dict:
        """PEFT saves the rows again under each tied module (GPT-2: ``lm_head``)."""
        state = {}
        for module in modules:
            for name in getattr(module, "tied_with", ()):
                state[f"{PREFIX}{name.rpartition('.')[0]}.trainable_tokens_delta"] = module.trainable_tokens_delta
        return state
