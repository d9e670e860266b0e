"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo et al., 2022), as PEFT computes it.

    dW = (W1a W1b) * (W2a W2b) * s          s = alpha / r;  W1a, W2a: (out, r);  W1b, W2b: (r, in)
    y' = y + x dW^T

W1a, W1b and W2a start kaiming-uniform and W2b at zero, so the adapted model
starts equal to the base. PEFT's rank and module dropouts (training-time only)
are not offered yet.

The folder: this config (torch-free), site.py (the SiteAdapter), peft.py (PEFT's LoHaConfig both ways);
the training-time dropouts it shares with LoKr are surgeon/methods/_lycoris.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["LohaConfig"]


@register_method("loha", sites=("linear",), adapter=".site:LohaWeights", peft=".peft:LohaPeft")
@dataclass(frozen=True)
class LohaConfig:
    """Low-rank Hadamard product adaptation, with PEFT's defaults."""

    r: int = param(gt=0, doc="rank of each factor")
    alpha: float | None = param(None, gt=0, doc="scale numerator; defaults to r")
    rank_dropout: float = param(0.0, ge=0, lt=1, doc="in training, drop rows of dW with this probability (rescaled by the kept share)")
    module_dropout: float = param(0.0, ge=0, lt=1, doc="in training, skip the whole adapter with this probability")

    rslora = False
    dropout = 0.0
    bias = False
    init = "kaiming"

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """Two pairs of factors: 2 r (in + out)."""
        return 2 * self.r * (in_features + out_features)

    @property
    def scale(self) -> float:
        """s = alpha / r (alpha defaults to r)."""
        return (self.r if self.alpha is None else self.alpha) / self.r
