"""The bitsandbytes ops of surgeon's graphs, and how a bitsandbytes layer's weight is read and written.

A ``bnb.nn.Linear4bit`` keeps its weight as a ``Params4bit`` (packed uint8
plus a ``QuantState`` object) and a ``Linear8bitLt`` as ``Int8Params`` (int8
rows ``CB`` plus a per-row scale ``SCB``). Capture replaces such a layer, while
exporting, by a stand-in whose forward is one call of an op defined here
(surgeon/capture/quantized_bases.py), so the graph keeps the quantized matmul as
it is:

- ``surgeon::linear_4bit`` runs ``bitsandbytes::gemm_4bit``, bitsandbytes'
  own registered op (its CUDA kernels on a GPU; dequantize + matmul on the
  CPU), so the graph computes exactly what ``Linear4bit`` computes;
- ``surgeon::linear_8bit`` runs ``bnb.matmul`` with a ``MatmulLtState``
  built from CB and SCB (LLM.int8 with its outlier threshold in evaluation,
  bitsandbytes' dequantize + matmul in CPU training), as ``Linear8bitLt``.

Both carry an autograd formula that recomputes the dequantized weight in the
backward (dx = g W; the frozen weight gets no gradient), as bitsandbytes'
autograd functions do, so training saves no full-precision weight, and a
fake implementation for export and ``torch.compile``. Folding into them:
passes/fold_quantized.py (with :func:`dequantized_weight` and
:func:`quantize_like`).

On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` (0.50: its CPU fused
kernel) has a second path: in evaluation mode, with an input that does not
require grad, its forward rewrites the layer's packed weight and ``QuantState``
in place into a CPU inference layout (nibbles regrouped by 32 rows, which needs
out_features divisible by 32; block scales rounded to bfloat16; double
quantization undone), and every later call multiplies in bfloat16 whatever the
compute dtype. The float32 scales are lost (bitsandbytes' inverse, run when it
saves the state dict, does not give them back), so a layer in that layout is
refused (:func:`quant_state`), and every 4-bit linear that capture or
:func:`surgeon.compiled.eager.attach` sees is kept off that path
(:func:`exact_4bit_matmuls`): the graph, later captures, folds and checkpoints
read the layer's tensors, and the eager model must compute what the graph does.

Kernels know nothing of graphs or rules: this module takes layers and tensors.
bitsandbytes is imported where it is called (it is an optional dependency).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Optional

import torch

from surgeon.diagnostics import ModelError

__all__ = [
    "bnb_kind", "int8_state", "quant_state", "dequantized_weight", "dequantize_4bit", "quantize_like",
    "exact_4bit_matmuls", "linear_4bit", "linear_8bit", "QUANTIZED_OPS",
]

# --- a layer's weight -------------------------------------------------------------------

# Linear4bit's own switch for the AVX512-BF16 CPU layout (bitsandbytes/nn/modules.py, set from has_avx512bf16()
# in __init__); the layout's mark on the QuantState.
_CPU_LAYOUT_SWITCH = "support_avx512bf16_for_cpu"
_CPU_LAYOUT_MARK = "packing_format_for_cpu"


def bnb_kind(module) -> str | None:
    """"4bit" for a ``bnb.nn.Linear4bit``, "8bit" for a ``Linear8bitLt`` (by class name: bitsandbytes is optional),
    None for any other module; a ModelError for one that holds no quantized weight yet."""
    names = {c.__name__ for c in type(module).__mro__}
    weight = getattr(module, "weight", None)
    if "Linear4bit" in names and weight is not None:
        if getattr(weight, "quant_state", None) is None:
            _refuse(module, "is not quantized yet (bitsandbytes quantizes a Linear4bit when it moves to a device)",
                    "call .to(device) on the model (the CPU counts) before compiling it")
        return "4bit"
    if "Linear8bitLt" in names and weight is not None:
        if weight.dtype != torch.int8:
            _refuse(module, "keeps float16 weights (has_fp16_weights=True): it is not an 8-bit base",
                    "load it with has_fp16_weights=False (transformers' load_in_8bit does), or as a plain model")
        return "8bit"
    return None


def _refuse(module, why: str, hint: str):
    raise ModelError(f"a {type(module).__name__} ({module.in_features} -> {module.out_features}) {why}", hint=hint)


def int8_state(module) -> tuple:
    """(CB int8 (out, in), SCB float32 (out,)) wherever bitsandbytes keeps them now (weight before the first
    forward, module.state after)."""
    weight = module.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return weight.as_subclass(torch.Tensor), scb


def quant_state(module):
    """The 4-bit module's ``QuantState``, refused when bitsandbytes has rewritten it into its CPU inference layout
    (its scales rounded to bfloat16 for good: nothing read from it is the weight the model was loaded with)."""
    state = module.weight.quant_state
    if getattr(state, _CPU_LAYOUT_MARK, False):
        raise ModelError(
            "a 4-bit weight is in bitsandbytes' CPU inference packing (the model ran in evaluation mode on an AVX512-BF16 CPU)",
            hint="load the model again from its checkpoint (saving it now writes bitsandbytes' lossy inverse of that layout)",
        )
    return state


def exact_4bit_matmuls(model):
    """Keep every bitsandbytes 4-bit linear of ``model`` (the model itself included) on its dequantize + matmul
    path on any CPU, the one the graph's ``surgeon::linear_4bit`` takes, so that its eager forward neither rounds
    to bfloat16 nor rewrites its tensors (see the module docstring). Refuses, before changing anything, a layer
    already rewritten. Returns a function that puts the previous settings back."""
    layers = [m for m in model.modules() if hasattr(m, _CPU_LAYOUT_SWITCH)]
    for module in layers:
        if getattr(module.weight, "quant_state", None) is not None:  # (one not quantized yet is capture's to refuse)
            quant_state(module)
    saved = [(module, getattr(module, _CPU_LAYOUT_SWITCH)) for module in layers]
    for module in layers:
        setattr(module, _CPU_LAYOUT_SWITCH, False)

    def restore():
        for module, value in saved:
            setattr(module, _CPU_LAYOUT_SWITCH, value)

    return restore


def dequantized_weight(module, dtype=None) -> torch.Tensor:
    """The module's weight, dequantized to ``dtype`` (default: its compute dtype): (out, in)."""
    kind = bnb_kind(module)
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        state = quant_state(module)
        w = bnbf.dequantize_4bit(module.weight.data, state)
        return w.to(dtype or module.compute_dtype or state.dtype)
    if kind == "8bit":
        cb, scb = int8_state(module)
        return (cb.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype or torch.float16)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear")


def quantize_like(module, weight, dtype=None) -> tuple:
    """``weight`` quantized with the bitsandbytes ``module``'s own scheme: (CB, SCB) for int8; (packed, QuantState)
    for 4-bit, quantized from ``dtype`` (default the compute dtype)."""
    import bitsandbytes.functional as bnbf

    if bnb_kind(module) == "8bit":
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return cb, scb
    state = quant_state(module)
    return bnbf.quantize_4bit(weight.to(dtype or module.compute_dtype or state.dtype), blocksize=state.blocksize,
                              compress_statistics=bool(state.nested), quant_type=state.quant_type, quant_storage=module.weight.dtype)


# --- the ops ---------------------------------------------------------------------------


def _absmax(absmax, absmax_8bit, absmax_code, absmax_offset):
    """The per-block scales, undoing double quantization (blocks of 256) when there is one."""
    if absmax_8bit is None:
        return absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256, torch.float32) + absmax_offset


def dequantize_4bit(packed, shape, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset, dtype):
    """W of ``shape`` (out, in) in ``dtype``, from its packed 4-bit blocks and their scales (the op's own arguments)."""
    scales = _absmax(absmax, absmax_8bit, absmax_code, absmax_offset)
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, scales, blocksize, quant_type, shape, dtype)


@torch.library.custom_op("surgeon::linear_4bit", mutates_args=())
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, shape: list[int], absmax: torch.Tensor, blocksize: int,
                quant_type: str, bias: Optional[torch.Tensor], absmax_8bit: Optional[torch.Tensor],
                absmax_code: Optional[torch.Tensor], absmax_offset: Optional[torch.Tensor]) -> torch.Tensor:
    """``x W^T + b`` with W in bitsandbytes' 4-bit blocks: ``bitsandbytes::gemm_4bit``."""
    importlib.import_module("bitsandbytes")  # registers the bitsandbytes ops and their kernels
    return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, shape, absmax, blocksize, quant_type, bias=bias,
                                                    absmax_8bit=absmax_8bit, absmax_code=absmax_code, absmax_offset=absmax_offset)


@linear_4bit.register_fake
def _(x, packed, shape, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_4bit(ctx, inputs, output):
    x, packed, shape, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = inputs
    ctx.save_for_backward(packed, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.layout = (list(shape), blocksize, quant_type)
    ctx.has_bias = bias is not None


def _backward_4bit(ctx, grad):
    """dx = g W with W dequantized again (nothing full-precision was saved); db = sum g; W gets none."""
    packed, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    shape, blocksize, quant_type = ctx.layout
    dx = db = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_4bit(packed, shape, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset, grad.dtype)
        dx = grad @ weight
    if ctx.has_bias and ctx.needs_input_grad[6]:
        db = grad.reshape(-1, grad.shape[-1]).sum(0)
    return dx, None, None, None, None, None, db, None, None, None


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


@torch.library.custom_op("surgeon::linear_8bit", mutates_args=())
def linear_8bit(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor], threshold: float,
                training: bool) -> torch.Tensor:
    """``x W^T + b`` with W = CB * SCB / 127 stored as int8 rows: ``bnb.matmul`` as ``Linear8bitLt`` calls it."""
    import bitsandbytes as bnb
    from bitsandbytes.autograd._functions import MatmulLtState

    state = MatmulLtState()
    state.CB, state.SCB, state.threshold = cb, scb, threshold
    state.has_fp16_weights, state.is_training = False, training
    with _quiet_bnb():
        return bnb.matmul(x, cb, bias=None if bias is None else bias.to(x.dtype), state=state).to(x.dtype)


@linear_8bit.register_fake
def _(x, cb, scb, bias, threshold, training):
    return x.new_empty((*x.shape[:-1], cb.shape[0]))


def _setup_8bit(ctx, inputs, output):
    x, cb, scb, bias, threshold, training = inputs
    ctx.save_for_backward(cb, scb)
    ctx.has_bias = bias is not None


def _backward_8bit(ctx, grad):
    cb, scb = ctx.saved_tensors
    dx = grad @ (cb.to(grad.dtype) * (scb.to(grad.dtype).unsqueeze(1) / 127.0)) if ctx.needs_input_grad[0] else None
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return dx, None, None, db, None, None


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)

QUANTIZED_OPS = (torch.ops.surgeon.linear_4bit.default, torch.ops.surgeon.linear_8bit.default)


@contextlib.contextmanager
def _quiet_bnb():
    """bitsandbytes logs a warning on every int8 call with float32 inputs (it casts them to float16)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
