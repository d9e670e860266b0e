"""Routed LoRA linear: each row of a batch with its own adapter (or none), in one call.

    y[m] = x[m] W^T + b + s[i] (x[m] A_i^T) B_i^T,   i = ids[m];   rows with i = -1: x[m] W^T + b

Adapters of different ranks are stacked with zero padding up to the largest
rank R: A (n, R, K), B (n, N, R), scales (n,). The kernels are the fused LoRA
linear's (lora_linear.py) in their routed form: the shrink gathers each row's
A (a (BM, R, BK) tile reduced over K) and the base GEMM's epilogue gathers
each row's B and scale (a (BM, BN, R) tile reduced over R), so the batch is
neither sorted nor split: one launch of each kernel whatever the mix of
adapters. The adapter arithmetic is ``2 R (K + N)`` per row as for one
adapter; the gathered loads of B are ``BM BN R`` per tile (served from cache
when rows share adapters), against ``BN R`` for a single adapter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from surgeon.kernels._fused import fused_kernels, launch, tile_sizes, use_triton
from surgeon.kernels._triton import TritonMissing, triton_mode

__all__ = ["routed_lora_linear_torch", "routed_lora_linear_triton", "routed_lora_linear", "stack_adapters"]


def stack_adapters(adapters) -> tuple:
    """[(A_i (r_i, K), B_i (N, r_i), s_i), ...] -> (A (n, R, K), B (n, N, R), scales (n,)), zero-padded to R = max r_i."""
    rank = max(a.shape[0] for a, _, _ in adapters)
    a0, b0, _ = adapters[0]
    a_stack = a0.new_zeros((len(adapters), rank, a0.shape[1]))
    b_stack = b0.new_zeros((len(adapters), b0.shape[0], rank))
    for i, (a, b, _) in enumerate(adapters):
        a_stack[i, : a.shape[0]] = a
        b_stack[i, :, : b.shape[1]] = b
    scales = torch.tensor([float(s) for _, _, s in adapters], dtype=torch.float32, device=a0.device)
    return a_stack, b_stack, scales


def _rows(x, ids):
    """x flattened to (M, K) and one id per row of it (ids given per leading row of x)."""
    per_row = x[..., 0].numel() // max(1, ids.numel()) if ids.numel() else 0
    return x.reshape(-1, x.shape[-1]), ids.repeat_interleave(per_row) if per_row != 1 else ids


def routed_lora_linear_torch(x, weight, bias, a_stack, b_stack, scales, ids):
    """The reference: the base linear, plus each adapter on its own rows."""
    y = F.linear(x, weight, bias)
    x2, row_ids = _rows(x, ids)
    y2 = y.reshape(-1, y.shape[-1]).clone()
    for i in row_ids.unique().tolist():
        if i < 0:
            continue
        rows = row_ids == i
        y2[rows] = y2[rows] + F.linear(F.linear(x2[rows], a_stack[i]), b_stack[i]) * scales[i].to(y.dtype)
    return y2.reshape(y.shape)


def routed_lora_linear_triton(x, weight, bias, a_stack, b_stack, scales, ids):
    """The routed kernels; checks the stacks, the ids and the dtypes first."""
    mode = triton_mode()
    if mode is None:
        raise TritonMissing("Triton kernels need Triton and a GPU (or TRITON_INTERPRET=1 for the CPU interpreter)")
    n_adapters, rank, k = a_stack.shape
    n = weight.shape[0]
    if b_stack.shape != (n_adapters, n, rank) or weight.shape[1] != k or x.shape[-1] != k or scales.shape != (n_adapters,):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, A {tuple(a_stack.shape)}, "
                         f"B {tuple(b_stack.shape)}, scales {tuple(scales.shape)}")
    if len({x.dtype, weight.dtype, a_stack.dtype, b_stack.dtype}) != 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError("x, weight and the stacks must share one of float16, bfloat16, float32")
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"ids must be integers, one per leading row of x: got {tuple(ids.shape)} {ids.dtype} for x {tuple(x.shape)}")
    x2, row_ids = _rows(x, ids)
    m = x2.shape[0]
    blocks = tile_sizes(m, n, k, rank)
    upcast = mode == "interpret" and x.dtype == torch.bfloat16
    h = torch.empty((m, rank), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    scales = scales.to(device=x.device, dtype=torch.float32)  # a graph may build them on the CPU
    row_ids = row_ids.to(device=x.device, dtype=torch.int32).contiguous()
    launch(fused_kernels(), x2, weight, bias, a_stack, b_stack, scales, row_ids, h, y,
            blocks, upcast, "ieee" if x.dtype == torch.float32 else "tf32")
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("surgeon::routed_lora_linear", mutates_args=())
def routed_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_stack: torch.Tensor,
                       b_stack: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row with adapter ``ids[row]`` of the stacks (-1: none): the routed kernels where Triton runs, else torch."""
    if use_triton(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return routed_lora_linear_triton(x, weight, bias, a_stack, b_stack, scales, ids)
    return routed_lora_linear_torch(x, weight, bias, a_stack, b_stack, scales, ids)


@routed_lora_linear.register_fake
def _(x, weight, bias, a_stack, b_stack, scales, ids):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, a_stack, b_stack, scales, ids = inputs
    ctx.save_for_backward(x, weight, a_stack, b_stack, scales, ids)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """Per adapter i with row weights w_m = s_i [ids_m = i] (masks, not gathers, so shapes stay static):
    dx = g W + sum_i ((w g) B_i) A_i;  dA_i = ((w g) B_i)^T x;  dB_i = (w g)^T (x A_i^T);  dW, db if they train.
    Costs what the unlowered routed graph's backward does: each adapter's skinny products over the batch."""
    x, weight, a_stack, b_stack, scales, ids = ctx.saved_tensors
    needs = ctx.needs_input_grad
    x2, row_ids = _rows(x, ids)
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = g2 @ weight if needs[0] else None
    da = torch.zeros_like(a_stack) if needs[3] else None
    db = torch.zeros_like(b_stack) if needs[4] else None
    for i in range(a_stack.shape[0]):
        gw = g2 * ((row_ids == i).to(g2.dtype) * scales[i].to(g2.dtype))[:, None]
        gb = gw @ b_stack[i]
        if dx is not None:
            dx = dx + gb @ a_stack[i]
        if da is not None:
            da[i] = gb.T @ x2
        if db is not None:
            db[i] = gw.T @ (x2 @ a_stack[i].T)
    dw = g2.T @ x2 if needs[1] else None
    dbias = g2.sum(0) if ctx.has_bias and needs[2] else None
    return (None if dx is None else dx.reshape(x.shape)), dw, dbias, da, db, None, None


routed_lora_linear.register_autograd(_backward, setup_context=_setup)
