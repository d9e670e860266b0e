"""Fused LoRA linear: ``y = x W^T (+ b) + s (x A^T) B^T`` in two Triton kernels, and its torch reference.

Shapes: x (M, K) (leading dimensions flattened), W (N, K), b (N,), A (R, K),
B (N, R), s a scalar tensor (the adapter's scale times its gate, so that
switching adapters changes a tensor, never the kernel).

The scheme (per call, element sizes e for x/W/A/B/y, fp32 for h):

1. shrink: ``h = x A^T``, (M, R) in fp32. Reads x and A, writes h:
   bytes ``e (M K + R K) + 4 M R``; FLOPs ``2 M K R``.
2. base GEMM with the expand in its epilogue: each (BM, BN) tile of y is
   ``x W^T`` accumulated over K in fp32 registers, then, before the single
   store, ``+ b`` and ``+ s h_tile B_tile^T`` (a (BM, BR) x (BR, BN) dot).
   Reads x, W, b, h (once per N tile) and B; writes y once:
   bytes ``e (M K + N K + M N + N R) + 4 M R (N / BN)``; FLOPs ``2 M N K + 2 M N R``.

Against the base linear alone (``e (M K + N K + M N)`` bytes, ``2 M N K``
FLOPs) the adapter adds one more read of x, the small A, B and h traffic, and
``2 R (M K + M N)`` FLOPs: for K = N = 4096, R = 16 that is 0.8 % more
arithmetic. The separate adapter pass over y that eager LoRA makes (write
``s (x A^T) B^T``, read it and y, write y again: ``3 e M N`` bytes) and the
rank-R intermediate in the output dtype are gone. The second read of x is
the price of not recomputing h in every N tile (which would cost
``2 M K R (N / BN)`` FLOPs instead).

GPU constraints the interpreter does not check: every ``tl.dot`` dimension
is at least 16 (BM, BN, BK >= 16 and R padded to BR = max(16, next power of
two)); the wrapper asserts them. In the interpreter bf16 tiles are upcast to
fp32 before ``tl.dot`` (its bf16 dot is wrong); on a GPU they stay bf16.

The two kernels live in _fused.py, which routed_lora.py and dora.py launch too;
this module is the op: its torch reference, the launcher that checks the
operands, and the autograd formula.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from surgeon.kernels._fused import check_operands, fused_kernels, launch, tile_sizes, use_triton
from surgeon.kernels._triton import TritonMissing, triton_mode

__all__ = ["lora_linear_torch", "lora_linear_eager", "lora_linear_triton", "lora_linear"]


def lora_linear_torch(x, weight, bias, lora_a, lora_b, scale):
    """The reference: ``F.linear(x, W, b) + s * F.linear(F.linear(x, A), B)``."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scale


def lora_linear_eager(x, weight, bias, lora_a, lora_b, scale):
    """The same sum in torch ops without a pass over y for the adapter: the scale goes on the thin
    ``h = x A^T`` (M x R), and ``h B^T`` is accumulated into the base GEMM's fresh output by ``addmm_``.

    Eager LoRA (the reference above, and PEFT) writes ``d = h B^T``, reads it to scale it, and reads
    it and y again to add: three extra passes over an (M, N) tensor per site, 10-20 % of a thin
    site's time on a CPU (bench/profile_step.py).
    """
    x2 = x.reshape(-1, x.shape[-1])
    h = (x2 @ lora_a.T).mul_(scale)
    y = F.linear(x2, weight, bias)
    return y.addmm_(h, lora_b.T).view(*x.shape[:-1], weight.shape[0])


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scale):
    """The fused kernels (see the module docstring); checks shapes, dtypes and devices first."""
    mode = triton_mode()
    if mode is None:
        raise TritonMissing("Triton kernels need Triton and a GPU (or TRITON_INTERPRET=1 for the CPU interpreter)")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    check_operands(x, weight, bias, lora_a, lora_b, scale)
    if mode == "gpu" and x.device.type != "cuda":
        raise ValueError(f"Triton runs on the GPU here; the tensors are on {x.device}")
    kernels = fused_kernels()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n, r = lora_b.shape
    blocks = tile_sizes(m, n, k, r)
    upcast = mode == "interpret" and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty((m, r), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch(kernels, x2, weight, bias, lora_a.unsqueeze(0), lora_b.unsqueeze(0), scale.reshape(1), None, h, y, blocks, upcast, precision)
    return y.reshape(*lead, n)


@torch.library.custom_op("surgeon::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T``: the fused kernels where Triton runs, the torch reference elsewhere."""
    if use_triton(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return lora_linear_triton(x, weight, bias, lora_a, lora_b, scale)
    return lora_linear_eager(x, weight, bias, lora_a, lora_b, scale)


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scale)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """dx = g W + s (g B) A;  dA = s (g B)^T x;  dB = s g^T (x A^T);  dW = g^T x and db = sum g if they train.

    dx has the forward's shape of computation with W^T, B^T, A^T in the roles of W, A, B, so where the
    kernels run it is the same two kernels on transposed views (no copies): the skinny ``(g B) A`` is
    added in the epilogue of ``g W``.
    """
    x, weight, lora_a, lora_b, scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    gbs = (g2 @ lora_b).mul_(scale)  # (M, R): the skinny product every adapter gradient uses, scaled
    dx = None
    if needs[0]:
        if use_triton(grad) and grad.dtype == weight.dtype:
            dx = lora_linear_triton(grad, weight.T, None, lora_b.T, lora_a.T, scale)
        else:  # (g W) with s (g B) A accumulated into it: no pass over dx for the adapter
            dx = (g2 @ weight).addmm_(gbs, lora_a).view(*grad.shape[:-1], -1)
    dw = g2.T @ x2 if needs[1] else None
    db = g2.sum(0) if ctx.has_bias and needs[2] else None
    da = gbs.T @ x2 if needs[3] else None
    db_lora = g2.T @ (x2 @ lora_a.T).mul_(scale) if needs[4] else None
    return dx, dw, db, da, db_lora, None


lora_linear.register_autograd(_backward, setup_context=_setup)
