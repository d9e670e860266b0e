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
"""

from typing import Optional

import torch
import torch.nn.functional as F

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


_KERNELS: dict = {}


def _kernels():
    """The Triton kernels, defined on first use (so that TRITON_INTERPRET, read at decoration, is set by then)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def shrink(x_ptr, a_ptr, ids_ptr, h_ptr, M, K, R, sxm, sxk, saa, sar, sak, shm, shr,
               BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               ROUTED: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        if ROUTED:  # each row its own adapter: A gathered per row (a (BM, BR, BK) tile), -1 rows none
            ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1)
            valid = ids >= 0
            row_a = tl.where(valid, ids, 0)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            if ROUTED:
                a3 = tl.load(
                    a_ptr + row_a[:, None, None] * saa + rr[None, :, None] * sar + rk[None, None, :] * sak,
                    mask=valid[:, None, None] & (rr[None, :, None] < R) & (rk[None, None, :] < K), other=0.0,
                )
                acc += tl.sum(x.to(tl.float32)[:, None, :] * a3.to(tl.float32), axis=2)
            else:
                a = tl.load(a_ptr + rr[None, :] * sar + rk[:, None] * sak, mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
                if UPCAST:
                    x, a = x.to(tl.float32), a.to(tl.float32)
                acc += tl.dot(x, a, input_precision=PRECISION)
        tl.store(h_ptr + rm[:, None] * shm + rr[None, :] * shr, acc, mask=(rm[:, None] < M) & (rr[None, :] < R))

    @triton.jit
    def base_and_expand(x_ptr, w_ptr, b_ptr, h_ptr, lb_ptr, s_ptr, ids_ptr, c_ptr, d_ptr, y_ptr, M, N, K, R,
                        sxm, sxk, swn, swk, shm, shr, sba, sbn, sbr, sym, syn,
                        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROUTED: tl.constexpr, COL_SCALE: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(x, w, input_precision=PRECISION)
        # epilogue: the adapter, then the bias, added to the accumulator before the one store of y
        rr = tl.arange(0, BR)
        h = tl.load(h_ptr + rm[:, None] * shm + rr[None, :] * shr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        if ROUTED:  # B and the scale gathered per row
            ids = tl.load(ids_ptr + rm, mask=rm < M, other=-1)
            valid = ids >= 0
            row_b = tl.where(valid, ids, 0)
            b3 = tl.load(
                lb_ptr + row_b[:, None, None] * sba + rn[None, :, None] * sbn + rr[None, None, :] * sbr,
                mask=valid[:, None, None] & (rn[None, :, None] < N) & (rr[None, None, :] < R), other=0.0,
            )
            scales = tl.load(s_ptr + row_b, mask=valid, other=0.0).to(tl.float32)
            acc += scales[:, None] * tl.sum(h[:, None, :] * b3.to(tl.float32), axis=2)
        else:
            bt = tl.load(lb_ptr + rn[None, :] * sbn + rr[:, None] * sbr, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
            lora = tl.dot(h, bt.to(tl.float32), input_precision="ieee")
            if COL_SCALE:  # DoRA: per output column, c times the base product plus d times the adapter's
                c = tl.load(c_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
                d = tl.load(d_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
                acc = acc * c[None, :] + lora * d[None, :]
            else:
                acc += tl.load(s_ptr).to(tl.float32) * lora
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=y_mask)

    _KERNELS.update(shrink=shrink, base_and_expand=base_and_expand, triton=triton)
    return _KERNELS


def _check(x, weight, bias, lora_a, lora_b, scale) -> None:
    tensors = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x, weight, lora_a, lora_b must share one of float16, bfloat16, float32; got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (*tensors.values(), scale)} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    n, k = weight.shape
    r = lora_a.shape[0]
    if x.shape[-1] != k or lora_a.shape != (r, k) or lora_b.shape != (n, r) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"lora_b {tuple(lora_b.shape)}, bias {None if bias is None else tuple(bias.shape)}"
        )
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one number, got shape {tuple(scale.shape)}")


def _blocks(m: int, n: int, k: int, r: int) -> dict:
    """Tile sizes: every tl.dot dimension >= 16 (NVIDIA's minimum), the rank padded to a power of two."""
    block_r = max(16, triton_next_pow2(r))
    blocks = dict(BM=64 if m > 32 else 16, BN=64, BK=32, BR=block_r)
    assert all(v >= 16 for v in blocks.values()), blocks
    return blocks


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scale):
    """The fused kernels (see the module docstring); checks shapes, dtypes and devices first."""
    mode = triton_mode()
    if mode is None:
        raise TritonMissing("Triton kernels need Triton and a GPU (or TRITON_INTERPRET=1 for the CPU interpreter)")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    _check(x, weight, bias, lora_a, lora_b, scale)
    if mode == "gpu" and x.device.type != "cuda":
        raise ValueError(f"Triton runs on the GPU here; the tensors are on {x.device}")
    kernels = _kernels()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n, r = lora_b.shape
    blocks = _blocks(m, n, k, r)
    upcast = mode == "interpret" and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty((m, r), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _launch(kernels, x2, weight, bias, lora_a.unsqueeze(0), lora_b.unsqueeze(0), scale.reshape(1), None, h, y, blocks, upcast, precision)
    return y.reshape(*lead, n)


def _launch(kernels, x2, weight, bias, a_stack, b_stack, scales, ids, h, y, blocks, upcast, precision, columns=None) -> None:
    """Both kernels over x2 (M, K); a_stack (n, R, K), b_stack (n, N, R): one adapter, or one per row with ``ids``;
    ``columns``: two (N,) vectors (c, d) making each output column ``c x W^T + d (x A^T) B^T`` before the bias
    (DoRA; ``scales`` is then unused)."""
    cdiv = kernels["triton"].cdiv
    m, k = x2.shape
    n, r = b_stack.shape[1], b_stack.shape[2]
    routed = ids is not None
    ids = ids if routed else h  # an unused pointer
    kernels["shrink"][(cdiv(m, blocks["BM"]),)](
        x2, a_stack, ids, h, m, k, r, *x2.stride(), *a_stack.stride(), *h.stride(),
        BM=blocks["BM"], BK=blocks["BK"], BR=blocks["BR"], UPCAST=upcast, PRECISION=precision, ROUTED=routed,
    )
    kernels["base_and_expand"][(cdiv(m, blocks["BM"]), cdiv(n, blocks["BN"]))](
        x2, weight, bias if bias is not None else y, h, b_stack, scales, ids, *(columns if columns is not None else (y, y)), y,
        m, n, k, r, *x2.stride(), *weight.stride(), *h.stride(), *b_stack.stride(), *y.stride(),
        HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision, ROUTED=routed, COL_SCALE=columns is not None,
        **blocks,
    )


def _use_triton(x) -> bool:
    mode = triton_mode()
    return (mode == "gpu" and x.device.type == "cuda") or (mode == "interpret" and x.device.type == "cpu")


@torch.library.custom_op("surgeon::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + s (x A^T) B^T``: the fused kernels where Triton runs, the torch reference elsewhere."""
    if _use_triton(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
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
        if _use_triton(grad) and grad.dtype == weight.dtype:
            dx = lora_linear_triton(grad, weight.T, None, lora_b.T, lora_a.T, scale)
        else:  # (g W) with s (g B) A accumulated into it: no pass over dx for the adapter
            dx = (g2 @ weight).addmm_(gbs, lora_a).view(*grad.shape[:-1], -1)
    dw = g2.T @ x2 if needs[1] else None
    db = g2.sum(0) if ctx.has_bias and needs[2] else None
    da = gbs.T @ x2 if needs[3] else None
    db_lora = g2.T @ (x2 @ lora_a.T).mul_(scale) if needs[4] else None
    return dx, dw, db, da, db_lora, None


lora_linear.register_autograd(_backward, setup_context=_setup)
