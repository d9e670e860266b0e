"""(IA)^3: learned vectors that rescale activations (Liu et al., 2022), as PEFT computes it.

    y' = y * l           l: (out,), starts at 1        (attention and other projections)
    y' = base(x * l)     l: (in,),  starts at 1        (feedforward=true: MLP down projections,
                                                        PEFT's feedforward_modules)

Folding scales the weight's rows (and the bias) by l, or its columns by l for
feed-forward sites, exactly as PEFT merges.

The folder: this config (torch-free), site.py (the SiteAdapter), peft.py (PEFT's IA3Config both ways).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method

__all__ = ["Ia3Config"]


@register_method("ia3", sites=("linear", "hf_conv1d"), adapter=".site:Ia3Weights", peft=".peft:Ia3Peft")
@dataclass(frozen=True)
class Ia3Config:
    """Infused adapter by inhibiting and amplifying inner activations."""

    feedforward: bool = param(False, doc="scale the input (feed-forward down projections) instead of the output")

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """One vector: in_features long with feedforward, else out_features."""
        return in_features if self.feedforward else out_features
