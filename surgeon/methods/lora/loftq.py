"""LoftQ (Li et al., 2023): a LoRA start that makes the quantized base plus the adapter close to the
full-precision weight.

For a site with full-precision weight W, its rank r, scale s and quantization q (the site's own scheme:
NF4/FP4 blocks or int8 rows)::

    Q_1 = the base as loaded (q(W))
    L_t R_t = rank-r truncated SVD of W - Q_t          (L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T)
    Q_{t+1} = q(W - L_t R_t)                            for t < T
    base = Q_T,   s B A = L_T R_T:   B = L_T / sqrt(s),  A = R_T / sqrt(s)

With T = 1 (``init="loftq"``) nothing in the model changes. With T > 1 (``loftq_iter=T``) the base's
quantized tensors are overwritten in place with Q_T, as PEFT's ``loftq_init`` replaces the base weight;
adapters saved from such a model belong with that base. PEFT stores L and R without the scale (the same
as surgeon's for s = 1); dividing by sqrt(s) keeps ``Q + s B A`` the approximation whatever alpha is.
"""

from __future__ import annotations

import torch

from surgeon.kernels.quantized import bnb_kind, dequantized_weight, int8_state, quantize_like

__all__ = ["loftq_start"]


def _low_rank(residual: torch.Tensor, r: int) -> tuple:
    u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
    root = sv[:r].sqrt()
    return u[:, :r] * root, root.unsqueeze(1) * vh[:r]


def _requantize_into(module, weight: torch.Tensor) -> torch.Tensor:
    """Quantize ``weight`` with the module's scheme into the module's own tensors (in place, so every graph
    sharing them sees it); returns the new dequantized weight (float32)."""
    if bnb_kind(module) == "8bit":
        cb, scb = int8_state(module)
        new_cb, new_scb = quantize_like(module, weight)
        cb.copy_(new_cb)
        scb.copy_(new_scb)
    else:
        state = module.weight.quant_state
        packed, new = quantize_like(module, weight, state.dtype)
        module.weight.data.copy_(packed.reshape(module.weight.shape))
        state.absmax.copy_(new.absmax)
        if state.nested:
            state.state2.absmax.copy_(new.state2.absmax)
            state.offset.copy_(new.offset)
    return dequantized_weight(module, torch.float32)


@torch.no_grad()
def loftq_start(adapter, module, full_precision: torch.Tensor, iterations: int) -> dict:
    """Set the LoRA ``adapter`` (and, for iterations > 1, the bitsandbytes ``module``'s base) by LoftQ.
    Returns the approximation error ||W - Q - s B A||_F before (the base alone) and after."""
    weight = full_precision.detach().to(torch.float32)
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"the full-precision weight is {tuple(weight.shape)}, the site is ({module.out_features}, {module.in_features})")
    base = dequantized_weight(module, torch.float32)
    before = (weight - base).norm().item()
    r = adapter.config.r
    left, right = _low_rank(weight - base, r)
    for _ in range(iterations - 1):
        base = _requantize_into(module, weight - left @ right)
        left, right = _low_rank(weight - base, r)
    root = adapter.scale ** 0.5
    adapter.lora_B.copy_(left / root)
    adapter.lora_A.copy_(right / root)
    return {"before": before, "after": (weight - base - adapter.delta(torch.float32)).norm().item()}
