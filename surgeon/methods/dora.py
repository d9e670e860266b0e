"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), as PEFT computes it.

    W' = m * (W + s B A) / ||W + s B A||_row          m: (out,), trainable, starts at ||W||_row

so the adapted model starts equal to the base. In the forward pass the row
norm is treated as a constant (detached), as in the paper's section 4.3 and in
PEFT. With s = alpha / r (alpha / sqrt(r) with rslora), A (r, in) kaiming and
B (out, r) zero as in LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.grammar.signature import param

from surgeon.methods._registry import register_method
from surgeon.methods.lora import lora_scale

__all__ = ["DoraConfig"]


@register_method("dora", sites=("linear", "hf_conv1d"))
@dataclass(frozen=True)
class DoraConfig:
    """Weight-decomposed low-rank adaptation, with PEFT's defaults."""

    r: int = param(gt=0, doc="rank of the update")
    alpha: float | None = param(None, gt=0, doc="scale numerator; defaults to r")
    dropout: float = param(0.0, ge=0, lt=1, doc="dropout probability on the adapter's input")
    rslora: bool = param(False, doc="scale by alpha / sqrt(r) instead of alpha / r")

    init = "kaiming"
    bias = False

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """A (r x in), B (out x r) and the magnitude vector (out)."""
        return self.r * (in_features + out_features) + out_features

    @property
    def scale(self) -> float:
        return lora_scale(self.r, self.alpha, self.rslora)
