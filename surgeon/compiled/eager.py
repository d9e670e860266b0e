"""Adapters in an eager model: forward hooks that run the compiled model's own parameters.

For ``generate()`` with its KV cache, which a captured graph does not have:
each adapted module gets a hook computing its method's ``eager`` form, read
through the adapter's gate as the graphs do, and the ``train`` modules' copies
stand in for their parameters. Training through the graph and generating
through the hooks use the very same tensors.

While attached, the model's bitsandbytes 4-bit linears stay on the
dequantize + matmul path the graph takes (surgeon.kernels.quantized.exact_4bit_matmuls):
on an AVX512-BF16 CPU, generation (evaluation mode, no grad) would otherwise
run them in bfloat16 and rewrite their tensors in place.
"""

from __future__ import annotations

from torch import nn

from surgeon.kernels.quantized import exact_4bit_matmuls

__all__ = ["attach"]


def attach(compiled, model: nn.Module) -> list:
    """Hook ``compiled``'s adapters into ``model``; returns handles (``.remove()`` detaches)."""
    handles = [_Handles(exact_4bit_matmuls(model))]  # first: it refuses a rewritten 4-bit layer before any hook
    for name, path, adapter in compiled.sites():
        hook = _gated_hook(adapter.hook(), compiled.adapter_gates, compiled.adapter_names.index(name))
        paths = [path]
        if getattr(adapter, "follows_ties", False):  # tied readers (lm_head) see the change too
            paths += [tied.rpartition(".")[0] for tied in adapter.tied_with]
        for module in map(model.get_submodule, paths):
            if getattr(hook, "is_pre_hook", False):  # an input-side method (IA3 on a feed-forward site)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
    for key, trained in compiled.trained.items():
        handles.append(_swap_module_params(model.get_submodule(key.replace("__", ".")), trained))
    return handles


def _gated_hook(hook, gates, index: int):
    """``hook`` read through the adapter's gate, as the graphs do: skipped at 0, interpolated in between."""
    pre = getattr(hook, "is_pre_hook", False)

    def gated(module, args, *output):
        gate = float(gates[index])
        if gate == 0:
            return None
        result = hook(module, args, *output)
        if gate == 1 or result is None:
            return result
        if pre:  # the new input tuple: interpolate its first element
            return (args[0] + gate * (result[0] - args[0]),) + tuple(result[1:])
        return output[0] + gate * (result - output[0])

    gated.is_pre_hook = pre
    return gated


class _Handles:
    def __init__(self, restore):
        self.restore = restore

    def remove(self):
        self.restore()


def _swap_module_params(target: nn.Module, source: nn.Module):
    saved = {n: p for n, p in target.named_parameters()}
    for name, param in source.named_parameters():
        owner_path, _, leaf = name.rpartition(".")
        setattr(target.get_submodule(owner_path) if owner_path else target, leaf, param)

    def restore():
        for name, param in saved.items():
            owner_path, _, leaf = name.rpartition(".")
            setattr(target.get_submodule(owner_path) if owner_path else target, leaf, param)

    return _Handles(restore)
