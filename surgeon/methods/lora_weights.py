"""The parameters of one LoRA adapter on one site (torch; lora.py holds the torch-free config).

    A: (r, in_features)    B: (out_features, r)    optional bias of B: (out_features,)

Initialisation follows PEFT: ``kaiming`` gives A kaiming-uniform (a = sqrt(5),
as ``nn.Linear``), ``gaussian`` gives A a normal with std 1/r, and B starts at
zero, so the adapted model starts equal to the base; ``zeros`` starts both at
zero (for weights that will be loaded).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lora import LoraConfig

__all__ = ["LoraWeights"]


class LoraWeights(nn.Module):
    def __init__(self, config: LoraConfig, in_features: int, out_features: int, *, dtype=torch.float32, device=None):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        factory = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))
        self.lora_B_bias = nn.Parameter(torch.zeros(out_features, **factory)) if config.bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.config.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.config.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.config.r)
            else:
                self.lora_A.zero_()
            self.lora_B.zero_()
            if self.lora_B_bias is not None:
                self.lora_B_bias.zero_()

    @property
    def scale(self) -> float:
        return self.config.scale

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """scale * B @ A, shape (out, in), computed in ``dtype``."""
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.config.r}, scale={self.scale:g}"


def attach_hook(weights: LoraWeights):
    """A forward hook adding this adapter's output to a module's (eager use, e.g. generate())."""
    import torch.nn.functional as F

    def hook(module, args, output):
        x = args[0].to(weights.lora_A.dtype)
        if module.training and weights.config.dropout > 0:
            x = F.dropout(x, weights.config.dropout, True)
        delta = F.linear(F.linear(x, weights.lora_A), weights.lora_B, weights.lora_B_bias) * weights.scale
        return output + delta.to(output.dtype)

    return hook
