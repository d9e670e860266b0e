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
read the site's input and output (LoRA) adapt them unchanged.
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
    "graph_weight", "dequantize_graph_site", "requantize_graph_site", "merged_quantized_state", "QUANTIZED_MERGES",
    "prepare_kbit_training",
]

# What a fold does with a quantized site: "dequantize" (the merged weight in full precision, the
# default) or "requantize" (the merged weight quantized again with the site's own scheme).
QUANTIZED_MERGES = ("dequantize", "requantize")


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
    from surgeon.grammar.diagnostics import ModelError

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


def _4bit_tensors(module) -> dict:
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from surgeon.grammar.diagnostics import ModelError

        raise ModelError(
            "a 4-bit weight is in bitsandbytes' CPU inference packing (the model ran in evaluation mode on an AVX512-BF16 CPU)",
            hint="open the model again, or save and reload it, before compiling",
        )
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

        state = module.weight.quant_state
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
    """While inside, every bitsandbytes linear of ``model`` is its stand-in (same tensors); restored after."""
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
    swapped = []
    try:
        for parent, leaf, module, stand_in in planned:
            setattr(parent, leaf, stand_in)
            swapped.append((parent, leaf, module))
        yield bool(swapped)
    finally:
        for parent, leaf, module in reversed(swapped):
            setattr(parent, leaf, module)


# --- folding into quantized sites (passes/fold.py) -----------------------------------------


def _graph_tensor(gm, arg):
    from surgeon.passes._graph import attribute

    return attribute(gm, arg.target) if getattr(arg, "op", None) == "get_attr" else None


def graph_weight(gm, node) -> torch.Tensor:
    """The float32 (out, in) weight a quantized op node of ``gm`` multiplies by."""
    if node.target is torch.ops.surgeon.linear_4bit.default:
        x, packed, shape, absmax, blocksize, quant_type, _, a8, code, offset = node.args
        t = lambda a: _graph_tensor(gm, a)  # noqa: E731
        return _dequantize_4bit(t(packed), list(shape), t(absmax), blocksize, quant_type, t(a8), t(code), t(offset), torch.float32)
    cb, scb = _graph_tensor(gm, node.args[1]), _graph_tensor(gm, node.args[2])
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def _compute_dtype(node, default):
    x = node.args[0]
    return x.meta["val"].dtype if "val" in getattr(x, "meta", {}) else default


def dequantize_graph_site(gm, nodes, weight) -> None:
    """Replace the quantized op ``nodes`` (every call of one site) by ``aten.linear`` on ``weight`` (set as the
    site's ``weight``, in the op's compute dtype), and drop the quantized tensors they read."""
    from surgeon.passes._graph import module_path

    path = module_path(nodes[0])
    owner = gm.get_submodule(path)
    readers = {a for node in nodes for a in node.args[1:] if getattr(a, "op", None) == "get_attr"}
    for name in [n for n in owner._buffers if n == "weight" or n.startswith("weight_")]:
        del owner._buffers[name]
    owner.register_parameter("weight", nn.Parameter(weight.to(_compute_dtype(nodes[0], weight.dtype)), requires_grad=False))
    graph = gm.graph
    for node in nodes:
        x = node.args[0]
        bias = node.args[6] if node.target is torch.ops.surgeon.linear_4bit.default else node.args[3]
        with graph.inserting_before(node):
            w = graph.get_attr(f"{path}.weight")
            linear = graph.call_function(torch.ops.aten.linear.default, (x, w, bias) if bias is not None else (x, w))
        linear.meta.update(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
    for reader in readers:
        if not reader.users:
            graph.erase_node(reader)


def _quantize_like(weight, node, gm) -> dict:
    """``weight`` quantized with the scheme of op ``node``: its stand-in's buffer name -> new tensor."""
    import bitsandbytes.functional as bnbf

    if node.target is torch.ops.surgeon.linear_8bit.default:
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return {"weight": cb, "weight_scb": scb}
    x, packed, shape, absmax, blocksize, quant_type, _, a8, code, offset = node.args
    weight = weight.to(_compute_dtype(node, weight.dtype))  # as the checkpoint does (_requantized_state)
    packed_new, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=a8 is not None,
                                           quant_type=quant_type, quant_storage=_graph_tensor(gm, packed).dtype)
    tensors = {"weight": packed_new.reshape(-1, 1)}
    if state.nested:
        tensors.update(weight_absmax=state.state2.absmax, weight_absmax_8bit=state.absmax,
                       weight_absmax_code=state.state2.code, weight_absmax_offset=state.offset.reshape(()))
    else:
        tensors["weight_absmax"] = state.absmax
    return tensors


def requantize_graph_site(gm, nodes, weight) -> None:
    """Give the quantized op ``nodes`` (every call of one site) the quantized ``weight`` instead (new tensors;
    the model keeps its own)."""
    from surgeon.passes._graph import module_path

    owner = gm.get_submodule(module_path(nodes[0]))
    for name, tensor in _quantize_like(weight, nodes[0], gm).items():
        owner.register_buffer(name, tensor)


def _requantized_state(path: str, module, weight) -> dict:
    """The state-dict entries bitsandbytes writes for ``module`` (at ``path``) holding ``weight`` quantized
    with the module's own scheme: what transformers loads as a pre-quantized checkpoint."""
    import bitsandbytes.functional as bnbf

    if _bnb_kind(module) == "8bit":
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return {f"{path}.weight": cb, f"{path}.SCB": scb}
    state = module.weight.quant_state
    compute = module.compute_dtype or state.dtype  # the graph's requantize_graph_site quantizes from the same
    packed, new_state = bnbf.quantize_4bit(weight.to(compute), blocksize=state.blocksize, compress_statistics=bool(state.nested),
                                           quant_type=state.quant_type, quant_storage=module.weight.dtype)
    entries = {f"{path}.weight": packed}
    entries.update({f"{path}.weight.{k}": v for k, v in new_state.as_dict(packed=True).items()})
    return entries


def _full_precision_dtype(model, module):
    """A dequantized weight's dtype: the 4-bit compute dtype; for int8, the model's own float dtype."""
    if _bnb_kind(module) == "4bit":
        return module.compute_dtype or module.weight.quant_state.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def merged_quantized_state(model, state: dict, merged: dict, mode: str) -> dict:
    """A merged state dict's quantized linears. ``merged``: weight name -> merged full-precision weight.

    "dequantize": every bitsandbytes linear becomes a plain weight (merged or not) in its full-precision
    dtype and its quantization entries go, for a checkpoint without ``quantization_config``.
    "requantize": the merged ones are quantized again as bitsandbytes writes them; the others stay.
    """
    transposed = _conv1d_paths(model) if mode == "dequantize" else set()
    for path, module in model.named_modules():
        if _bnb_kind(module) is None:
            continue
        name = f"{path}.weight"
        if mode == "requantize" and name not in merged:
            continue
        ours = [f"{path}.SCB"] if mode == "requantize" else [f"{path}.SCB", f"{path}.weight_format"]
        for key in [k for k in state if k.startswith(name + ".") or k in ours]:
            del state[key]
        if mode == "requantize":
            state.update(_requantized_state(path, module, merged[name]))
        else:
            weight = merged[name] if name in merged else dequantized_weight(module, torch.float32)
            weight = weight.T.contiguous() if path in transposed else weight
            state[name] = weight.to(_full_precision_dtype(model, module))
    return state


def _conv1d_paths(model) -> set:
    """Modules that the unquantized model class builds as transformers' Conv1D (GPT-2: weight (in, out)), which
    bitsandbytes quantized as (out, in) linears: a full-precision checkpoint must store them transposed back."""
    import copy

    config = getattr(model, "config", None)
    if config is None or getattr(config, "quantization_config", None) is None:
        return set()
    plain = copy.deepcopy(config)
    del plain.quantization_config
    with torch.device("meta"):
        reference = type(model)(plain)
    return {path for path, m in reference.named_modules() if type(m).__name__ == "Conv1D"}


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
