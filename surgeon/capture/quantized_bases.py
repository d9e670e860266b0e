"""Bases quantized by bitsandbytes (QLoRA), as capture sees them: their storage, and stand-ins while exporting.

``torch.export`` cannot trace a ``bnb.nn.Linear4bit`` or ``Linear8bitLt`` as it
is: it swaps parameters for fake tensors, and the tensor subclasses rebuild
themselves in ``forward`` (a ``RuntimeError`` about FakeTensor). Dequantizing
the model to capture it is what we must not do.

So, only while exporting (:func:`quantized_stand_ins`), each quantized linear
is replaced by a stand-in module holding the very same tensors as plain
buffers (aliases, no copies): ``weight`` (the packed data), ``weight_absmax``
and, with double quantization, ``weight_absmax_8bit`` / ``weight_absmax_code``
/ ``weight_absmax_offset``; or ``weight`` (int8) and ``weight_scb``. Its
forward is one call of ``surgeon::linear_4bit`` or ``surgeon::linear_8bit``
(the ops of kernels/quantized.py), which the graph keeps as it is. Capture
classifies these ops as ``linear`` sites with a :class:`Quantization`; methods
that only read the site's input and output (LoRA) adapt them unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from surgeon.kernels.quantized import bnb_kind, exact_4bit_matmuls, int8_state, linear_4bit, linear_8bit, quant_state

__all__ = ["Quantization", "quantization_of", "quantized_stand_ins", "prepare_kbit_training"]


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


def quantization_of(module) -> Quantization | None:
    """The module's quantization, or None for a module bitsandbytes does not quantize."""
    kind = bnb_kind(module)
    if kind == "4bit":
        state = module.weight.quant_state
        compute = module.compute_dtype or state.dtype
        return Quantization(state.quant_type, str(compute).replace("torch.", ""), state.blocksize, bool(state.nested))
    if kind == "8bit":
        return Quantization("int8", "float16", threshold=float(module.state.threshold))
    return None


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


# --- the stand-ins -----------------------------------------------------------------------


def _4bit_tensors(module) -> dict:
    """The 4-bit layer's tensors by the buffer names of its stand-in: the packed weight as an (n, 1) column, the
    block scales (and their own quantization, with double quantization)."""
    state = quant_state(module)
    tensors = {"weight": module.weight.as_subclass(torch.Tensor).reshape(-1, 1)}
    if state.nested:
        if state.state2.blocksize != 256:
            raise NotImplementedError("bitsandbytes supports double quantization with blocks of 256 only")
        tensors.update(weight_absmax=state.state2.absmax, weight_absmax_8bit=state.absmax,
                       weight_absmax_code=state.state2.code, weight_absmax_offset=state.offset.reshape(()))
    else:
        tensors["weight_absmax"] = state.absmax
    return tensors


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
        cb, scb = int8_state(module)
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
        kind = bnb_kind(module)
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
