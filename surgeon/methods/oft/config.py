"""OFT: orthogonal finetuning (Qiu et al., 2023), as PEFT's current OFT computes it.

A site's input (a linear layer's x; an embedding's output) of dimension
``d = r * b`` is rotated by a block-diagonal matrix ``R = diag(R_1, ..., R_r)``
of ``r`` blocks of size ``b``, and the base layer sees the rotated input::

    y' = base(x R) = x R W^T + bias          folding gives   W' = W R^T
    y' = embedding(ids) R                    (an embedding)  E' = E R

Each block comes from ``b (b - 1) / 2`` trainable numbers: the row of PEFT's
``oft_R`` (shape (r, b (b - 1) / 2); one row shared by every block with
``block_share``) fills the strict upper triangle of ``U_i`` (row-major), and
``Q_i = U_i - U_i^T`` is skew-symmetric. The rotation is its Cayley transform:

    neumann=true (PEFT's default), n = neumann_terms:
        R_i = I + 2 Q + 2 Q^2 + ... + 2 Q^(n-2) + Q^(n-1)     (~ (I + Q)(I - Q)^-1;
              n = 2: I + 2 Q;  n = 3 is computed as n = 4;  n = 1: I)
    neumann=false:   R_i = (I - Q)(I + Q)^-1                  (exact, orthogonal)

(For the same weights the two rotate in opposite directions, as in PEFT.)
``oft_R`` starts at zero: R = I, the adapted model starts equal to the base.

Give ``r`` or ``block_size``, not both; with neither, ``block_size`` is 32
(PEFT's default). When the given one does not divide d, PEFT's rule takes the
nearest divisor (the smaller on a tie; d itself when it exceeds d) and derives
the other as d / it. With ``coft`` (constrained OFT), before every use each
stored Q_i is pulled back to Frobenius norm at most ``eps / sqrt(rows of oft_R)``
(Q_i <- Q_i * that / ||Q_i|| when larger), and, as PEFT does, the projected
values are written back into the parameter.

PEFT's ``module_dropout`` is accepted on reading but does nothing, as in PEFT
0.21.2, whose forward never applies it. Its ``bias`` other than "none" is refused.

The folder: this config (torch-free), site.py (the SiteAdapter and the rotation), peft.py (PEFT's
OFTConfig both ways).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["OftConfig", "nearest_divisor", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 32  # PEFT's oft_block_size when r is not given


def nearest_divisor(dimension: int, value: int) -> int:
    """PEFT's adjustment of r or block_size that does not divide ``dimension``.

    ``dimension`` itself when ``value`` >= it; otherwise the nearest divisor
    below or above, the one below when both are as near.
    """
    if value >= dimension:
        return dimension
    higher = value
    while higher <= dimension and dimension % higher:
        higher += 1
    lower = value
    while lower > 1 and dimension % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


@register_method("oft", sites=("linear", "embedding"), adapter=".site:OftWeights", peft=".peft:OftPeft")
@dataclass(frozen=True)
class OftConfig:
    """Orthogonal finetuning: a block-diagonal rotation of the input, with PEFT's defaults."""

    r: int | None = param(None, gt=0, doc="number of blocks (give r or block_size, not both)")
    block_size: int | None = param(None, gt=0, doc="size of each block; 32 when neither r nor block_size is given")
    coft: bool = param(False, doc="constrained OFT: keep each block's skew matrix within eps of zero")
    eps: float = param(6e-5, ge=0, doc="COFT's radius (per block: eps / sqrt(stored blocks))")
    block_share: bool = param(False, doc="one rotation block shared by all blocks")
    neumann: bool = param(True, doc="the Cayley-Neumann series (PEFT's default); false: the exact Cayley transform")
    neumann_terms: int = param(5, ge=1, doc="terms of the Cayley-Neumann series")

    def __post_init__(self):
        if self.r is not None and self.block_size is not None:
            # r x block_size is the rotated dimension: one determines the other (PEFT refuses both too)
            raise ValueError("give r or block_size, not both (r x block_size is the rotated dimension)")

    def blocks(self, dimension: int) -> tuple[int, int]:
        """(r, block_size) on a site rotating ``dimension`` features, as PEFT derives them."""
        if self.r is not None:
            r = self.r if dimension % self.r == 0 else nearest_divisor(dimension, self.r)
            return r, dimension // r
        size = self.block_size or DEFAULT_BLOCK_SIZE
        size = size if dimension % size == 0 else nearest_divisor(dimension, size)
        return dimension // size, size

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """(r, or 1 with block_share) x b (b - 1) / 2.

        The rotated dimension is the weight's last one: a linear weight's ``in``, an embedding's ``dim``.
        """
        dimension = weight_shape[-1] if weight_shape else in_features
        r, size = self.blocks(dimension)
        return (1 if self.block_share else r) * (size * (size - 1) // 2)
