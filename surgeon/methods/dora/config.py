"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), as PEFT computes it.

    W' = m * (W + s B A) / ||W + s B A||_row          m: (out,), trainable, starts at ||W||_row

so the adapted model starts equal to the base. In the forward pass the row
norm is treated as a constant (detached), as in the paper's section 4.3 and in
PEFT. With s = alpha / r (alpha / sqrt(r) with rslora), A (r, in) kaiming and
B (out, r) zero as in LoRA.

The folder: this config (torch-free), site.py (the SiteAdapter, LoRA's with the magnitude), peft.py
(PEFT writes DoRA as LoRA with ``use_dora``), lowering.py (the fused ``dora_linear`` pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.methods._registry import register_method
from surgeon.methods.lora.config import LowRankFields

__all__ = ["DoraConfig"]


@register_method("dora", sites=("linear", "hf_conv1d"), adapter=".site:DoraWeights", peft=".peft:DoraPeft",
                 lowering=".lowering:PATTERNS")
@dataclass(frozen=True)
class DoraConfig(LowRankFields):
    """Weight-decomposed low-rank adaptation, with PEFT's defaults."""

    init = "kaiming"
    bias = False
    residual = False  # it never starts from the base weight's SVD or QR

    def trainable_params(self, in_features: int, out_features: int, weight_shape: tuple = ()) -> int:
        """A (r x in), B (out x r) and the magnitude vector (out)."""
        return self.r * (in_features + out_features) + out_features
