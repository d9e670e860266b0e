"""LoRA: a low-rank update added to a frozen linear map.

For a site computing ``y = x W^T + b`` with ``W`` of shape (out, in), LoRA adds
trainable ``A`` (r, in) and ``B`` (out, r)::

    y = x W^T + b + s * dropout(x) A^T B^T,    s = alpha / r   (alpha / sqrt(r) with rslora)

``B`` starts at zero, so the adapted model starts equal to the base model.
Folding gives ``W' = W + s * B A`` (transposed for GPT-2's ``Conv1D``, whose
weight is stored as (in, out)).

On an embedding (num_embeddings x dim), as PEFT: A is (r, num_embeddings) and
starts at zero, B is (dim, r) and starts normal, and
``y' = y + s * embedding(ids, A^T) B^T``; folding gives ``E' = E + s (B A)^T``.

``init="pissa"`` (PiSSA, Meng et al., 2024) starts from the base weight's top
r singular triplets, W = U S V^T: B0 = U_r sqrt(S_r / s), A0 = sqrt(S_r / s) V_r^T
(``pissa_niter_K``: the same from K iterations of randomized SVD);
``init="olora"`` (OLoRA, Büyükakyüz, 2024) from its QR decomposition W = QR:
B0 = Q[:, :r], A0 = R[:r]. Both make the base the residual W - s B0 A0, so
that the model starts equal to the base; surgeon leaves the user's weight
alone and computes the residual in the graph (see site.py).
``init="loftq"`` (LoftQ, Li et al., 2023), on a bitsandbytes-quantized site
only, starts s B A at the low-rank part of the quantization error W - Q(W)
(the full-precision W comes with the model; see loftq.py).

On a Conv1d/2d/3d, as PEFT: A is a convolution (r, in, *kernel) with the
base's stride, padding and dilation, B a 1x1 convolution (out, r/g, 1, ...)
grouped as the base (g groups; r must divide by g);
``y' = y + s * conv(conv(dropout(x), A), B)``; folding adds the composed
kernel, which a grouped base cannot take (folding it is refused, as in PEFT).

The folder: this config (torch-free, registered here), site.py (the SiteAdapter: parameters, graph
branch, fold, eager hook, PEFT tensors), peft.py (PEFT's LoraConfig both ways), lowering.py (the
fused-kernel patterns), mha.py (LoRA on nn.MultiheadAttention), loftq.py (LoftQ's start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["LoraConfig", "LowRankFields", "lora_scale", "is_residual_init", "QUANTIZED_INITS"]

# Inits that start from the base weight's values (its SVD or QR), making the base a residual W - s B0 A0.
RESIDUAL_INITS = ("pissa", "olora")
# The inits a LoRA on a bitsandbytes-quantized linear can take: those that do not read the weight, and LoftQ.
QUANTIZED_INITS = ("kaiming", "gaussian", "zeros", "loftq")


def is_residual_init(init: str) -> bool:
    """Does ``init`` start from the base weight's values (PiSSA's SVD, OLoRA's QR)?"""
    return init in RESIDUAL_INITS or init.startswith("pissa_niter_")


def lora_scale(r: int, alpha: float | None, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rslora; alpha defaults to r (shared by the LoRA family)."""
    alpha = r if alpha is None else alpha
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass(frozen=True)
class LowRankFields:
    """The fields of an update s B A that the LoRA family shares (LoRA, DoRA), and its scale."""

    r: int = param(gt=0, doc="rank of the update")
    alpha: float | None = param(None, gt=0, doc="scale numerator; defaults to r")
    dropout: float = param(0.0, ge=0, lt=1, doc="dropout probability on the adapter's input")
    rslora: bool = param(False, doc="scale by alpha / sqrt(r) instead of alpha / r")

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rslora."""
        return lora_scale(self.r, self.alpha, self.rslora)


@register_method("lora", sites=("linear", "hf_conv1d", "embedding", "conv1d", "conv2d", "conv3d"), adapter=".site:LoraWeights",
                 multi_weight=".mha:MhaLoraWeights", peft=".peft:LoraPeft", lowering=".lowering:PATTERNS")
@dataclass(frozen=True)
class LoraConfig(LowRankFields):
    """Low-rank adaptation (Hu et al., 2021), with PEFT's defaults."""

    init: str = param(
        "kaiming",
        choices=("kaiming", "gaussian", "zeros", "pissa", "olora", "loftq"),
        pattern=(r"pissa_niter_[1-9][0-9]*", "pissa_niter_<K>"),
        doc="initialisation: of A (B starts at zero), or from the base weight's SVD (pissa) or QR (olora), "
        "or the quantization error of a bitsandbytes base (loftq)",
    )
    bias: bool = param(False, doc="give B a trainable bias (PEFT's lora_bias)")
    loftq_iter: int = param(1, gt=0, doc="LoftQ's alternating steps (init=\"loftq\"; more than 1 re-quantizes the base)")

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """A (r x in) and B (out x r), plus B's bias (out) with ``bias``; a conv's A is (r, in, *kernel)."""
        fan_in, b_width = in_features, self.r
        if len(weight_shape) > 2:  # a convolution: A sees in x kernel; B is grouped as the base (in / weight_shape[1] groups)
            fan_in = in_features * math.prod(weight_shape[2:])
            b_width = self.r // max(1, in_features // weight_shape[1])
        return self.r * fan_in + out_features * b_width + (out_features if self.bias else 0)

    @property
    def residual(self) -> bool:
        """Does it start from the base weight's SVD or QR (the base becomes W - s B0 A0)?"""
        return is_residual_init(self.init)

    @staticmethod
    def low_rank_arguments(rank: int) -> dict:
        """A plain product of rank ``rank`` at scale 1 (alpha = r): what a weighted merge makes."""
        return {"r": rank, "alpha": rank}
