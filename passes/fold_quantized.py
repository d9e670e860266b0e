"""Folding into bitsandbytes-quantized sites (passes/fold.py, surgeon/compiled/checked_fold.py).

A quantized site merges in float32 from its dequantized weight; then either
"dequantize" (the merged weight stays in full precision, in the site's compute
dtype: a plain linear in the graph, a plain weight in the checkpoint) or
"requantize" (the merged weight quantized again with the site's own scheme,
which adds error). The graph and the checkpoint quantize from the same dtype,
so the folded graph describes the saved model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from surgeon.kernels.quantized import bnb_kind, dequantize_4bit, dequantized_weight, quant_state, quantize_like

from surgeon.passes._graph import attribute, module_path

__all__ = ["QUANTIZED_MERGES", "graph_weight", "dequantize_graph_site", "requantize_graph_site", "merged_quantized_state",
           "conv1d_paths"]

# What a fold does with a quantized site: "dequantize" (the merged weight in full precision, the
# default) or "requantize" (the merged weight quantized again with the site's own scheme).
QUANTIZED_MERGES = ("dequantize", "requantize")


def _graph_tensor(gm, arg):
    return attribute(gm, arg.target) if getattr(arg, "op", None) == "get_attr" else None


def graph_weight(gm, node) -> torch.Tensor:
    """The float32 (out, in) weight a quantized op node of ``gm`` multiplies by."""
    if node.target is torch.ops.surgeon.linear_4bit.default:
        x, packed, shape, absmax, blocksize, quant_type, _, a8, code, offset = node.args
        t = lambda a: _graph_tensor(gm, a)  # noqa: E731
        return dequantize_4bit(t(packed), list(shape), t(absmax), blocksize, quant_type, t(a8), t(code), t(offset), torch.float32)
    cb, scb = _graph_tensor(gm, node.args[1]), _graph_tensor(gm, node.args[2])
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def _compute_dtype(node, default):
    x = node.args[0]
    return x.meta["val"].dtype if "val" in getattr(x, "meta", {}) else default


def dequantize_graph_site(gm, nodes, weight) -> None:
    """Replace the quantized op ``nodes`` (every call of one site) by ``aten.linear`` on ``weight`` (set as the
    site's ``weight``, in the op's compute dtype), and drop the quantized tensors they read."""
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


def _quantized_buffers(weight, node, gm) -> dict:
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
    owner = gm.get_submodule(module_path(nodes[0]))
    for name, tensor in _quantized_buffers(weight, nodes[0], gm).items():
        owner.register_buffer(name, tensor)


def _requantized_state(path: str, module, weight) -> dict:
    """The state-dict entries bitsandbytes writes for ``module`` (at ``path``) holding ``weight`` quantized
    with the module's own scheme: what transformers loads as a pre-quantized checkpoint."""
    if bnb_kind(module) == "8bit":
        cb, scb = quantize_like(module, weight)
        return {f"{path}.weight": cb, f"{path}.SCB": scb}
    packed, new_state = quantize_like(module, weight)  # from the compute dtype, as the graph's requantize_graph_site
    entries = {f"{path}.weight": packed}
    entries.update({f"{path}.weight.{k}": v for k, v in new_state.as_dict(packed=True).items()})
    return entries


def _full_precision_dtype(model, module):
    """A dequantized weight's dtype: the 4-bit compute dtype; for int8, the model's own float dtype."""
    if bnb_kind(module) == "4bit":
        return module.compute_dtype or quant_state(module).dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def merged_quantized_state(model, state: dict, merged: dict, mode: str) -> dict:
    """A merged state dict's quantized linears. ``merged``: weight name -> merged full-precision weight.

    "dequantize": every bitsandbytes linear becomes a plain weight (merged or not) in its full-precision
    dtype and its quantization entries go, for a checkpoint without ``quantization_config``.
    "requantize": the merged ones are quantized again as bitsandbytes writes them; the others stay.
    """
    transposed = conv1d_paths(model) if mode == "dequantize" else set()
    for path, module in model.named_modules():
        if bnb_kind(module) is None:
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


def conv1d_paths(model) -> set:
    """Modules that the unquantized model class builds as transformers' Conv1D (GPT-2: weight (in, out)), which
    bitsandbytes quantized as (out, in) linears: a full-precision checkpoint must store them transposed back."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "quantization_config", None) is None:
        return set()
    plain = copy.deepcopy(config)
    del plain.quantization_config
    with torch.device("meta"):
        reference = type(model)(plain)
    return {path for path, m in reference.named_modules() if type(m).__name__ == "Conv1D"}
