"""VeRA: vector-based random matrix adaptation (Kopiczko et al., 2024), as PEFT computes it.

Two frozen random matrices are shared by all the sites of one adapter: ``A``
of shape (r, max in) and ``B`` of shape (max out, r), the largest input and
output sizes among the adapter's sites. A site with ``in`` inputs and ``out``
outputs uses their corners ``A_s = A[:, :in]`` and ``B_s = B[:out, :]``, and
trains only two vectors, ``d`` (r) and ``b`` (out)::

    y' = y + b * ((d * (dropout(x) A_s^T)) B_s^T)
    dW = diag(b) B_s diag(d) A_s          (out, in; transposed for GPT-2's Conv1D)

``b`` starts at zero and ``d`` at ``d_initial``, so the adapted model starts
equal to the base. A and B are drawn from a CPU ``torch.Generator`` seeded with
``projection_prng_key``: A first, then B, each uniform in +-sqrt(3) * sqrt(2) /
sqrt(fan_in) (kaiming-uniform with gain sqrt(2); fan_in is max in for A and r
for B). Folding gives ``W' = W + dW``.

PEFT holds one VeRA config per adapter, so every site of an adapter must use
the same arguments.

The folder: this config (torch-free), site.py (the SiteAdapter and the shared projections), peft.py
(PEFT's VeraConfig both ways).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["VeraConfig"]


@register_method("vera", sites=("linear", "hf_conv1d"), adapter=".site:VeraWeights", peft=".peft:VeraPeft")
@dataclass(frozen=True)
class VeraConfig:
    """Vector-based random matrix adaptation, with PEFT's defaults (r required)."""

    r: int = param(gt=0, doc="rows of the shared random projection A (columns of B)")
    d_initial: float = param(0.1, doc="initial value of every entry of the trained vector d (b starts at zero)")
    # torch.Generator.manual_seed takes any 64-bit value, signed or not
    projection_prng_key: int = param(0, ge=-(2**63), le=2**64 - 1, doc="seed of the generator that draws A and B")
    dropout: float = param(0.0, ge=0, lt=1, doc="dropout probability on the adapter's input")
    save_projection: bool = param(True, doc="write A and B into saved adapter files (else they are drawn again from the seed)")

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """The vectors d (r) and b (out); A and B are frozen."""
        return self.r + out_features
