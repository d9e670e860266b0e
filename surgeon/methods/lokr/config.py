"""LoKr: low-rank Kronecker product adaptation (Edalati et al., 2022; LyCORIS), as PEFT computes it.

    dW = (W1 kron W2) * s       s = alpha / r;  out = l*k, in = m*n (factored near the square roots,
                                 or by ``factor``);  W1: (l, m),  W2: (k, n)
    y' = y + x dW^T

W2 is itself a rank-r product W2a W2b when r < max(k, n) / 2, and W1 too with
``decompose_both`` when r < max(l, m) / 2, exactly as PEFT decides. W1 (or W1a)
starts at zero, so the adapted model starts equal to the base. In training,
``rank_dropout`` zeroes rows of dW (each with probability p; with
``rank_dropout_scale`` the kept rows are divided by the kept share) and
``module_dropout`` skips the whole adapter with probability p, as PEFT does.

The folder: this config (torch-free, with the shapes), site.py (the SiteAdapter), peft.py (PEFT's
LoKrConfig both ways); the dropouts it shares with LoHa are surgeon/methods/_lycoris.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["LokrConfig", "factorization", "lokr_shapes"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension, m <= n: m = factor if it divides, else the divisor pair
    nearest the square root that keeps m <= factor (PEFT's and LyCORIS's rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@register_method("lokr", sites=("linear",), adapter=".site:LokrWeights", peft=".peft:LokrPeft")
@dataclass(frozen=True)
class LokrConfig:
    """Low-rank Kronecker product adaptation, with PEFT's defaults."""

    r: int = param(gt=0, doc="rank of the decomposed factors")
    alpha: float | None = param(None, gt=0, doc="scale numerator; defaults to r")
    factor: int | None = param(None, gt=0, doc="Kronecker factor of each dimension; default: near its square root")
    decompose_both: bool = param(False, doc="decompose W1 as well as W2 into rank-r products")
    rank_dropout: float = param(0.0, ge=0, lt=1, doc="in training, drop rows of dW with this probability")
    module_dropout: float = param(0.0, ge=0, lt=1, doc="in training, skip the whole adapter with this probability")
    rank_dropout_scale: bool = param(False, doc="rescale the kept rows by the kept share (as LoHa always does)")

    rslora = False
    dropout = 0.0
    bias = False
    init = "kaiming"

    @property
    def scale(self) -> float:
        """s = alpha / r (alpha defaults to r)."""
        return (self.r if self.alpha is None else self.alpha) / self.r

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        return sum(a * b for a, b in lokr_shapes(self, in_features, out_features).values())


def lokr_shapes(config: LokrConfig, in_features: int, out_features: int) -> dict:
    """PEFT's parameter names -> shapes for one site."""
    in_m, in_n = factorization(in_features, config.factor or -1)
    out_l, out_k = factorization(out_features, config.factor or -1)
    shapes = {}
    if config.decompose_both and config.r < max(out_l, in_m) / 2:
        shapes.update(lokr_w1_a=(out_l, config.r), lokr_w1_b=(config.r, in_m))
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if config.r < max(out_k, in_n) / 2:
        shapes.update(lokr_w2_a=(out_k, config.r), lokr_w2_b=(config.r, in_n))
    else:
        shapes["lokr_w2"] = (out_k, in_n)
    return shapes
