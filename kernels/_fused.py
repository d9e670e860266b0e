"""The two Triton kernels every fused adapter op launches, their tile sizes and their launcher.

``shrink`` computes ``h = x A^T`` (M, R) in fp32; ``base_and_expand`` computes
each (BM, BN) tile of ``x W^T`` and adds, in its epilogue before the one store
of y, the adapter ``s h B^T`` and the bias. lora_linear.py's docstring counts
their bytes and FLOPs. Flags make the same two kernels serve the other ops:
``ROUTED`` gathers A, B and the scale per row (routed_lora.py: each row its own
adapter, -1 none), ``COL_SCALE`` scales each output column as
``c x W^T + d (x A^T) B^T`` (dora.py). The kernels are defined on first use,
so that ``TRITON_INTERPRET``, read when they are decorated, is set by then.
"""

from __future__ import annotations

import torch

from surgeon.kernels._triton import triton_mode

__all__ = ["fused_kernels", "check_operands", "tile_sizes", "next_pow2", "launch", "use_triton"]


_KERNELS: dict = {}


def fused_kernels() -> dict:
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


def check_operands(x, weight, bias, lora_a, lora_b, scale) -> None:
    """One float dtype, one device, shapes that fit (see lora_linear.py's docstring): a TypeError or ValueError."""
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


def tile_sizes(m: int, n: int, k: int, r: int) -> dict:
    """Tile sizes: every tl.dot dimension >= 16 (NVIDIA's minimum), the rank padded to a power of two."""
    block_r = max(16, next_pow2(r))
    blocks = dict(BM=64 if m > 32 else 16, BN=64, BK=32, BR=block_r)
    assert all(v >= 16 for v in blocks.values()), blocks
    return blocks


def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def launch(kernels, x2, weight, bias, a_stack, b_stack, scales, ids, h, y, blocks, upcast, precision, columns=None) -> None:
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


def use_triton(x) -> bool:
    """Do the kernels run on ``x``'s device here: a CUDA tensor with a GPU, a CPU one under the interpreter."""
    mode = triton_mode()
    return (mode == "gpu" and x.device.type == "cuda") or (mode == "interpret" and x.device.type == "cpu")
