"""DoRA on a linear: the row norm of W + s B A without materialising B A, and the magnitude in the epilogue.

    n_i^2 = ||W_i||^2 + 2 s <W_i A^T, B_i> + s^2 <B_i (A A^T), B_i>      (the factored norm)
    y = (m / n) * (x W^T + s (x A^T) B^T) + b                           (PEFT's DoRA, n detached)

``row_norm``: one program per block of BM rows streams W once: it accumulates
``||W_i||^2`` and the (BM, R) product ``W A^T`` over K, then in its epilogue
reads B's rows and the (R, R) ``A A^T`` (made by torch, r^2 numbers) and
writes n (N floats). Bytes ``e (N K + R K + N R) + 4 N``, FLOPs ``2 N K R``
(no (N, K) temporary, against two for ``||W + s B A||`` done directly).
``dora_linear`` then runs the fused LoRA linear kernels with two per-column
vectors applied in the epilogue, ``c x W^T + d (x A^T) B^T`` before the bias
(c = m / n, d = s m / n for an adapter alone; the gate g of several adapters
enters as c = 1 + g (m/n - 1), d = g s m/n): y is written once.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from surgeon.kernels._fused import check_operands, fused_kernels, launch, next_pow2, tile_sizes, use_triton
from surgeon.kernels._triton import TritonMissing, triton_mode

__all__ = ["dora_row_norm_torch", "dora_row_norm_triton", "dora_linear", "dora_linear_torch"]


def dora_row_norm_torch(weight, lora_a, lora_b, scale):
    """sqrt(||W||^2 + 2 s <W A^T, B> + s^2 <B (A A^T), B>) per row, in float32 (the reference)."""
    w, a, b = (t.float() for t in (weight, lora_a, lora_b))
    s = float(scale)
    squared = (w * w).sum(1) + 2 * s * (b * (w @ a.T)).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
    return squared.clamp_min(0).sqrt()


_ROW_NORM: dict = {}


def _row_norm_kernel():
    if _ROW_NORM:
        return _ROW_NORM["kernel"]
    import triton
    import triton.language as tl

    @triton.jit
    def row_norm(w_ptr, a_ptr, b_ptr, aat_ptr, n_ptr, N, K, R, s, swn, swk, sar, sak, sbn, sbr, sqr, sqc,
                 BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        rn = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        wa = tl.zeros((BM, BR), dtype=tl.float32)
        w_sq = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            w = tl.load(w_ptr + rn[:, None] * swn + rk[None, :] * swk, mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            a = tl.load(a_ptr + rr[None, :] * sar + rk[:, None] * sak, mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            wf = w.to(tl.float32)
            w_sq += tl.sum(wf * wf, axis=1)
            if UPCAST:
                w, a = wf, a.to(tl.float32)
            wa += tl.dot(w, a, input_precision=PRECISION)
        b = tl.load(b_ptr + rn[:, None] * sbn + rr[None, :] * sbr, mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(tl.float32)
        aat = tl.load(aat_ptr + rr[:, None] * sqr + rr[None, :] * sqc, mask=(rr[:, None] < R) & (rr[None, :] < R), other=0.0)
        baa = tl.dot(b, aat, input_precision="ieee")
        squared = w_sq + 2 * s * tl.sum(b * wa, axis=1) + s * s * tl.sum(baa * b, axis=1)
        tl.store(n_ptr + rn, tl.sqrt(tl.maximum(squared, 0.0)), mask=rn < N)

    _ROW_NORM.update(kernel=row_norm, triton=triton)
    return row_norm


def dora_row_norm_triton(weight, lora_a, lora_b, scale):
    """The row-norm kernel: n (N,) float32, for W (N, K), A (R, K), B (N, R)."""
    mode = triton_mode()
    if mode is None:
        raise TritonMissing("Triton kernels need Triton and a GPU (or TRITON_INTERPRET=1 for the CPU interpreter)")
    n, k = weight.shape
    r = lora_a.shape[0]
    if lora_a.shape != (r, k) or lora_b.shape != (n, r) or len({weight.dtype, lora_a.dtype, lora_b.dtype}) != 1:
        raise ValueError(f"shapes or dtypes do not fit: W {tuple(weight.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}")
    kernel = _row_norm_kernel()
    aat = (lora_a.float() @ lora_a.float().T).contiguous()
    norm = torch.empty(n, dtype=torch.float32, device=weight.device)
    block_m, block_k, block_r = 32, 32, max(16, next_pow2(r))
    kernel[(_ROW_NORM["triton"].cdiv(n, block_m),)](
        weight, lora_a, lora_b, aat, norm, n, k, r, float(scale), *weight.stride(), *lora_a.stride(), *lora_b.stride(),
        *aat.stride(), BM=block_m, BK=block_k, BR=block_r, UPCAST=mode == "interpret" and weight.dtype == torch.bfloat16,
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
    )
    return norm


def _columns(magnitude, norm, scale, gate):
    """Per output column (c, d) with y = c x W^T + d (x A^T) B^T + b: c = 1 + g (m/n - 1), d = g s m/n.

    The graph's DoRA site computes ``y0 + b + g ((f - 1) y0 + f s B A x)`` with f = m / n and g the adapter's
    gate (1 when it alone is active); for g = 1 this is PEFT's ``f (y0 + s B A x) + b``.
    """
    f = magnitude.float() / norm
    g = gate.float()
    return 1 + g * (f - 1), g * scale.float() * f


def dora_linear_torch(x, weight, bias, lora_a, lora_b, scale, magnitude, gate=None):
    """PEFT's DoRA (no dropout), gated: c (x W^T) + d (x A^T) B^T + b (see ``_columns``), n detached."""
    gate = torch.ones((), device=x.device) if gate is None else gate
    c, d = _columns(magnitude, dora_row_norm_torch(weight, lora_a.detach(), lora_b.detach(), scale), scale, gate)
    out = F.linear(x, weight) * c.to(x.dtype) + F.linear(F.linear(x, lora_a), lora_b) * d.to(x.dtype)
    return out + (0 if bias is None else bias)


@torch.library.custom_op("surgeon::dora_linear", mutates_args=())
def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: torch.Tensor, magnitude: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """DoRA linear: the row-norm kernel, then the fused LoRA kernels with (c, d) in the epilogue (torch elsewhere)."""
    if not (use_triton(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return dora_linear_torch(x, weight, bias, lora_a, lora_b, scale, magnitude, gate)
    # a graph makes the scale (and may keep the gate) as CPU scalars: the kernels read them on x's device
    scale, gate = (torch.as_tensor(t, dtype=torch.float32, device=x.device) for t in (scale, gate))
    check_operands(x, weight, bias, lora_a, lora_b, scale)
    if gate.numel() != 1 or magnitude.shape != (weight.shape[0],):
        raise ValueError(f"gate must hold one number and magnitude one per output row; got {tuple(gate.shape)}, {tuple(magnitude.shape)}")
    c, d = (t.contiguous() for t in _columns(magnitude, dora_row_norm_triton(weight, lora_a, lora_b, scale), scale, gate))
    x2 = x.reshape(-1, x.shape[-1])
    m, n, r = x2.shape[0], weight.shape[0], lora_a.shape[0]
    h = torch.empty((m, r), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    upcast = triton_mode() == "interpret" and x.dtype == torch.bfloat16
    launch(fused_kernels(), x2, weight, bias, lora_a.unsqueeze(0), lora_b.unsqueeze(0), scale.float().reshape(1), None, h, y,
            tile_sizes(m, n, x2.shape[1], r), upcast, "ieee" if x.dtype == torch.float32 else "tf32", columns=(c, d))
    return y.reshape(*x.shape[:-1], n)


@dora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, magnitude, gate):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, magnitude, gate = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scale, magnitude, gate)


def _backward(ctx, grad):
    """With y = c u0 + d u1 + b, u0 = x W^T, u1 = (x A^T) B^T, c = 1 + g (m/n - 1), d = g s m/n (n detached):
    g' = grad: dx = (g' c) W + ((g' d) B) A, dA = ((g' d) B)^T x, dB = (g' d)^T (x A^T),
    dm = (g / n) sum_rows(g' (u0 + s u1)), dgate = sum(g' ((m/n - 1) u0 + s (m/n) u1))."""
    x, weight, lora_a, lora_b, scale, magnitude, gate = ctx.saved_tensors
    needs = ctx.needs_input_grad
    norm = dora_row_norm_torch(weight, lora_a, lora_b, scale)
    c, d = (t.to(grad.dtype) for t in _columns(magnitude, norm, scale, gate))
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    h = x2 @ lora_a.T
    gd = g2 * d
    gb = gd @ lora_b
    dx = ((g2 * c) @ weight + gb @ lora_a).reshape(x.shape) if needs[0] else None
    da = gb.T @ x2 if needs[3] else None
    db = gd.T @ h if needs[4] else None
    dm = dgate = None
    if needs[6] or needs[7]:
        u0, u1 = x2 @ weight.T, h @ lora_b.T
        if needs[6]:
            dm = ((g2 * (u0 + u1 * scale)).sum(0) * gate / norm).to(magnitude.dtype)
        if needs[7]:
            f = (magnitude.float() / norm).to(grad.dtype)
            dgate = (g2 * ((f - 1) * u0 + f * scale * u1)).sum().to(gate.dtype).reshape(gate.shape)
    return dx, None, None, da, db, None, dm, dgate


dora_linear.register_autograd(_backward, setup_context=_setup)
