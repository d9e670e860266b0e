"""A decoder-only language model as one graph step over a static KV cache: what generation runs.

``DecoderStep`` wraps a transformers causal LM with a ``StaticCache`` of
``batch`` rows and ``length`` positions whose tensors are the step's buffers.
Its forward takes only what a deployment has and returns plain tensors::

    logits = step(input_ids,       # [B, T] the new tokens (T = prompt length at prefill, 1 per decode step)
                  attention_mask,  # [B, length] 1 where the cache holds a real token or T's tokens are written
                  position_ids,    # [B, T] each new token's position in its row (left padding shifts them)
                  cache_position)  # [T] where T's tokens go in the cache: start, start+1, ...
    # -> [B, vocab], the logits of each row's last new token

The step's modules are the model's own children under the same names, so a
program exported from it names its sites as the model's program does and the
pass pipeline adapts it unchanged; its parameters are the model's (shared).
One program serves prefill and decode: the new-token dimension is dynamic.

Sliding-window layers get a full-length cache (as transformers' executorch
export does): their mask still keeps the window, so the result is the same up
to ``length`` positions, at the memory of a full cache.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from surgeon.capture.export import _capture_error, _quiet_torch_logs
from surgeon.diagnostics import ModelError

__all__ = ["DecoderStep", "export_decoder", "example_step_inputs", "is_decoder_lm", "STEP_INPUTS"]

STEP_INPUTS = ("input_ids", "attention_mask", "position_ids", "cache_position")


def is_decoder_lm(model) -> bool:
    """Is ``model`` a transformers decoder-only language model that can generate?"""
    config = getattr(model, "config", None)
    return (config is not None and hasattr(model, "generate") and not getattr(config, "is_encoder_decoder", False)
            and type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")))


def _head_shape(config) -> tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // (getattr(config, "num_attention_heads", None) or config.n_head)
    return heads, head_dim


class DecoderStep(nn.Module):
    """One generation step of ``model`` over a static cache of ``batch`` rows and ``length`` positions."""

    def __init__(self, model: nn.Module, batch: int, length: int):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

        for name, child in model.named_children():  # the model's modules, under their own paths
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.__dict__["lm"] = model  # not a submodule: its children are ours
        self.batch, self.length = batch, length
        config = model.config.get_text_config()
        self.cache = StaticCache(config=config, max_cache_len=length)
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer) or type(layer) is not StaticLayer:
                self.cache.layers[i] = StaticLayer(length)
        heads, head_dim = _head_shape(config)
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.cache.early_initialization(batch, heads, head_dim, dtype, device)
        for i, layer in enumerate(self.cache.layers):  # non-persistent: never in a state dict
            self.register_buffer(f"cache_keys_{i}", layer.keys, persistent=False)
            self.register_buffer(f"cache_values_{i}", layer.values, persistent=False)
            self.register_buffer(f"cache_length_{i}", layer.cumulative_length, persistent=False)

    def reset(self) -> None:
        """Empty the cache (a new generation; stale entries are masked anyway, this keeps them zero)."""
        for name, buffer in self.named_buffers():
            if name.startswith("cache_"):
                buffer.zero_()

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        # The cache layers must write the buffers export traces (it swaps the module's own), so they are
        # read through the module on every call, and each writes from cache_position[0] on.
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = getattr(self, f"cache_keys_{i}"), getattr(self, f"cache_values_{i}")
            layer.cumulative_length = getattr(self, f"cache_length_{i}")
            layer.cumulative_length.copy_(cache_position[0])
        out = type(self.lm).forward(self.lm, input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]


def example_step_inputs(step: DecoderStep, tokens: int = 2) -> dict:
    """Inputs of a prefill of ``tokens`` tokens in every row (what the step is exported on)."""
    device = step.cache_keys_0.device
    mask = torch.zeros(step.batch, step.length, dtype=torch.long, device=device)
    mask[:, :tokens] = 1
    return dict(input_ids=torch.ones(step.batch, tokens, dtype=torch.long, device=device), attention_mask=mask,
                position_ids=torch.arange(tokens, device=device).expand(step.batch, tokens),
                cache_position=torch.arange(tokens, device=device))


def export_decoder(step: DecoderStep, name: str):
    """``step``'s ExportedProgram, the new-token dimension dynamic (1 to ``length``); a ModelError saying why not."""
    tokens = Dim("new_tokens", min=1, max=step.length)
    dynamic = dict(input_ids={1: tokens}, attention_mask=None, position_ids={1: tokens}, cache_position={0: tokens})
    was = step.lm.training
    step.lm.eval()
    try:
        with _quiet_torch_logs(), torch.no_grad():
            return torch.export.export(step, (), example_step_inputs(step), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs where and why
        raise _capture_error(step, f"{name} (static-cache decoder)", exc, []) from None
    finally:
        step.lm.train(was)
        step.reset()
