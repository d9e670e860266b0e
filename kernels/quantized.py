"""Bases quantized by bitsandbytes (QLoRA): how capture sees them, and how their weights are read back.

A ``bnb.nn.Linear4bit`` keeps its weight as a ``Params4bit`` (packed uint8
plus a ``QuantState`` object) and a ``Linear8bitLt`` as ``Int8Params`` (int8
rows ``CB`` plus a per-row scale ``SCB``). ``torch.export`` cannot trace
them as they are: it swaps parameters for fake tensors, and the tensor
subclasses rebuild themselves in ``forward`` (a ``RuntimeError`` about
FakeTensor). Dequantizing the model to capture it is what we must not do.

So, only while exporting, each quantized linear is replaced by a stand-in
module holding the very same tensors as plain buffers (aliases, no copies):
``weight`` (the packed data), ``weight_absmax`` and, with double
quantization, ``weight_absmax_8bit`` / ``weight_absmax_code`` /
``weight_absmax_offset``; or ``weight`` (int8) and ``weight_scb``. Its
forward is one call of a surgeon op that the graph keeps as it is:

- ``surgeon::linear_4bit`` runs ``bitsandbytes::gemm_4bit``, bitsandbytes'
  own registered op (its CUDA kernels on a GPU; dequantize + matmul on the
  CPU), so the graph computes exactly what ``Linear4bit`` computes;
- ``surgeon::linear_8bit`` runs ``bnb.matmul`` with a ``MatmulLtState``
  built from CB and SCB (LLM.int8 with its outlier threshold in evaluation,
  bitsandbytes' dequantize + matmul in CPU training), as ``Linear8bitLt``.

Both carry an autograd formula that recomputes the dequantized weight in the
backward (dx = g W; the frozen weight gets no gradient), as bitsandbytes'
autograd functions do, so training saves no full-precision weight, and a
fake implementation for export and ``torch.compile``. Capture classifies
these ops as ``linear`` sites with a :class:`Quantization`; methods that only
read the site's input and output (LoRA) adapt them unchanged. Folding into
them: passes/fold_quantized.py.

On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` (0.50: its CPU fused
kernel) has a second path: in evaluation mode, with an input that does not
require grad, its forward rewrites the layer's packed weight and ``QuantState``
in place into a CPU inference layout (nibbles regrouped by 32 rows, which needs
out_features divisible by 32; block scales rounded to bfloat16; double
quantization undone), and every later call multiplies in bfloat16 whatever the
compute dtype. The float32 scales are lost (bitsandbytes' inverse, run when it
saves the state dict, does not give them back), so a layer in that layout is
refused (:func:`_quant_state`), and every 4-bit linear that capture or
:func:`surgeon.compiled.eager.attach` sees is kept off that path
(:func:`exact_4bit_matmuls`): the graph, later captures, folds and checkpoints
read the layer's tensors, and the eager model must compute what the graph does.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = [
    "Quantization", "quantization_of", "dequantized_weight", "quantized_stand_ins", "QUANTIZED_OPS",
    "quantize_like", "prepare_kbit_training", "exact_4bit_matmuls",
]

# Linear4bit's own switch for the AVX512-BF16 CPU layout (bitsandbytes/nn/modules.py, set from has_avx512bf16()
# in __init__); the layout's mark on the QuantState.
_CPU_LAYOUT_SWITCH = "support_avx512bf16_for_cpu"
_CPU_LAYOUT_MARK = "packing_format_for_cpu"


@dataclass(frozen=True)
class Quantization:
    """How a linear's weight is stored: ``nf4`` / ``fp4`` (4-bit blocks) or ``int8`` (rows)."""

    scheme: str
    compute_dtype: str  # the dtype its matmul runs in ("float32", "bfloat16", ...)
    blocksize: int | None = None
    double_quant: bool = False
    threshold: float | None = None  # LLM.int8's outlier threshold

    def describe(self) -> str:
        if self.scheme == "int8":
            return f"int8 (LLM.int8, threshold {self.threshold:g})"
        return f"{self.scheme}{' double-quant' if self.double_quant else ''}, blocks of {self.blocksize}, compute {self.compute_dtype}"


def _bnb_kind(module) -> str | None:
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
    from surgeon.diagnostics import ModelError

    raise ModelError(f"a {type(module).__name__} ({module.in_features} -> {module.out_features}) {why}", hint=hint)


def quantization_of(module) -> Quantization | None:
    """The module's quantization, or None for a module bitsandbytes does not quantize."""
    kind = _bnb_kind(module)
    if kind == "4bit":
        state = module.weight.quant_state
        compute = module.compute_dtype or state.dtype
        return Quantization(state.quant_type, str(compute).replace("torch.", ""), state.blocksize, bool(state.nested))
    if kind == "8bit":
        return Quantization("int8", "float16", threshold=float(module.state.threshold))
    return None


def _int8_state(module) -> tuple:
    """(CB int8 (out, in), SCB float32 (out,)) wherever bitsandbytes keeps them now (weight before the first
    forward, module.state after)."""
    weight = module.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return weight.as_subclass(torch.Tensor), scb


def _quant_state(module):
    """The 4-bit module's ``QuantState``, refused when bitsandbytes has rewritten it into its CPU inference layout
    (its scales rounded to bfloat16 for good: nothing read from it is the weight the model was loaded with)."""
    state = module.weight.quant_state
    if getattr(state, _CPU_LAYOUT_MARK, False):
        from surgeon.diagnostics import ModelError

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
            _quant_state(module)
    saved = [(module, getattr(module, _CPU_LAYOUT_SWITCH)) for module in layers]
    for module in layers:
        setattr(module, _CPU_LAYOUT_SWITCH, False)

    def restore():
        for module, value in saved:
            setattr(module, _CPU_LAYOUT_SWITCH, value)

    return restore


def _4bit_tensors(module) -> dict:
    state = _quant_state(module)
    tensors = {"weight": module.weight.as_subclass(torch.Tensor).reshape(-1, 1)}
    if state.nested:
        if state.state2.blocksize != 256:
            raise NotImplementedError("bitsandbytes supports double quantization with blocks of 256 only")
        tensors.update(weight_absmax=state.state2.absmax, weight_absmax_8bit=state.absmax,
                       weight_absmax_code=state.state2.code, weight_absmax_offset=state.offset.reshape(()))
    else:
        tensors["weight_absmax"] = state.absmax
    return tensors


def dequantized_weight(module, dtype=None) -> torch.Tensor:
    """The module's weight, dequantized to ``dtype`` (default: its compute dtype): (out, in)."""
    kind = _bnb_kind(module)
    if kind == "4bit":
        import bitsandbytes.functional as bnbf

        state = _quant_state(module)
        w = bnbf.dequantize_4bit(module.weight.data, state)
        return w.to(dtype or module.compute_dtype or state.dtype)
    if kind == "8bit":
        cb, scb = _int8_state(module)
        return (cb.float() * (scb.float().unsqueeze(1) / 127.0)).to(dtype or torch.float16)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear")


# --- the ops ---------------------------------------------------------------------------


def _absmax(absmax, absmax_8bit, absmax_code, absmax_offset):
    """The per-block scales, undoing double quantization (blocks of 256) when there is one."""
    if absmax_8bit is None:
        return absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256, torch.float32) + absmax_offset


def _dequantize_4bit(packed, shape, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset, dtype):
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
        weight = _dequantize_4bit(packed, shape, absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset, grad.dtype)
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
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- the stand-ins -----------------------------------------------------------------------


class _Linear4bitStandIn(nn.Module):
    """What capture sees of a ``Linear4bit``: its tensors as buffers, its matmul as ``surgeon.linear_4bit``."""

    def __init__(self, module):
        super().__init__()
        state = module.weight.quant_state
        self.in_features, self.out_features = module.in_features, module.out_features
        for name, tensor in _4bit_tensors(module).items():
            self.register_buffer(name, tensor)
        self.bias = module.bias
        self.layout = (list(state.shape), state.blocksize, state.quant_type)
        self.compute_dtype = module.compute_dtype or state.dtype

    def forward(self, x):
        shape, blocksize, quant_type = self.layout
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = linear_4bit(x.to(self.compute_dtype), self.weight, shape, self.weight_absmax, blocksize, quant_type, bias,
                        getattr(self, "weight_absmax_8bit", None), getattr(self, "weight_absmax_code", None),
                        getattr(self, "weight_absmax_offset", None))
        return y.to(dtype)


class _Linear8bitStandIn(nn.Module):
    """What capture sees of a ``Linear8bitLt``: CB and SCB as buffers, its matmul as ``surgeon.linear_8bit``."""

    def __init__(self, module):
        super().__init__()
        cb, scb = _int8_state(module)
        self.in_features, self.out_features = module.in_features, module.out_features
        self.register_buffer("weight", cb)
        self.register_buffer("weight_scb", scb)
        self.bias = module.bias
        self.threshold = float(module.state.threshold)

    def forward(self, x):
        return linear_8bit(x, self.weight, self.weight_scb, self.bias, self.threshold, self.training)


@contextlib.contextmanager
def quantized_stand_ins(model):
    """While inside, every bitsandbytes linear of ``model`` is its stand-in (same tensors); restored after.

    The 4-bit linears stay on their exact CPU path after too (:func:`exact_4bit_matmuls`, not undone): the
    graph aliases their tensors and later captures read them again, which bitsandbytes' CPU inference
    layout would replace."""
    planned = []  # every stand-in is made (and may refuse its module) before the model is touched
    for path, module in list(model.named_modules()):
        kind = _bnb_kind(module)
        if kind is None or not path:
            continue
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        stand_in = _Linear4bitStandIn(module) if kind == "4bit" else _Linear8bitStandIn(module)
        stand_in.train(module.training)
        planned.append((parent, leaf, module, stand_in))
    exact_4bit_matmuls(model)
    swapped = []
    try:
        for parent, leaf, module, stand_in in planned:
            setattr(parent, leaf, stand_in)
            swapped.append((parent, leaf, module))
        yield bool(swapped)
    finally:
        for parent, leaf, module in reversed(swapped):
            setattr(parent, leaf, module)


def quantize_like(module, weight, dtype=None) -> tuple:
    """``weight`` quantized with the bitsandbytes ``module``'s own scheme: (CB, SCB) for int8; (packed, QuantState)
    for 4-bit, quantized from ``dtype`` (default the compute dtype)."""
    import bitsandbytes.functional as bnbf

    if _bnb_kind(module) == "8bit":
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return cb, scb
    state = _quant_state(module)
    return bnbf.quantize_4bit(weight.to(dtype or module.compute_dtype or state.dtype), blocksize=state.blocksize,
                              compress_statistics=bool(state.nested), quant_type=state.quant_type, quant_storage=module.weight.dtype)


def prepare_kbit_training(model) -> int:
    """PEFT's ``prepare_model_for_kbit_training`` as far as it applies to a graph: every parameter frozen,
    and the float16/bfloat16 parameters that are not quantized (norms, embeddings, the LM head) made
    float32, in place, before capture. (Its gradient checkpointing and input-gradient hooks are for eager
    modules: the graph's backward reaches the inputs without them.) Returns how many were upcast."""
    upcast = 0
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32)
            upcast += 1
    return upcast
