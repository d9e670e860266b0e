"""Helpers to run the same adapter through PEFT (the reference) and surgeon."""

import torch
from peft import LoraConfig, get_peft_model

from surgeon.capture.demos import build_demo


def randomize_adapters(compiled, seed: int = 0) -> None:
    """Give every adapter non-zero weights, so that it changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, weights in compiled.sites():
            weights.lora_A.copy_(torch.randn(weights.lora_A.shape, generator=generator) * 0.1)
            weights.lora_B.copy_(torch.randn(weights.lora_B.shape, generator=generator) * 0.1)
            if weights.lora_B_bias is not None:
                weights.lora_B_bias.copy_(torch.randn(weights.lora_B_bias.shape, generator=generator) * 0.1)


def peft_twin(compiled, demo, **lora_kwargs):
    """A PEFT model on a fresh copy of the same base weights (the demo named ``demo``, or the model ``demo``),
    with the compiled model's adapter weights copied in."""
    model = get_peft_model(build_demo(demo) if isinstance(demo, str) else demo, LoraConfig(**lora_kwargs))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for _, path, weights in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            layer.lora_A["default"].weight.copy_(weights.lora_A)
            layer.lora_B["default"].weight.copy_(weights.lora_B)
            if weights.lora_B_bias is not None:
                layer.lora_B["default"].bias.copy_(weights.lora_B_bias)
            assert layer.scaling["default"] == weights.scale, (path, layer.scaling["default"], weights.scale)
    return model


def inputs(batch: int = 2, seq: int = 7, labels: bool = True):
    ids = (torch.arange(batch * seq).reshape(batch, seq) * 7 + 3) % 1000
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        kwargs["labels"] = ids
    return kwargs


def exact_bnb_cpu_path(model):
    """``model`` with each bitsandbytes ``Linear4bit`` on its dequantize + matmul path on every CPU, as surgeon's
    graph (returned, changed in place). On a CPU with AVX512-BF16, bitsandbytes' forward in evaluation mode with an
    input that does not require grad switches a layer to a bfloat16 kernel for good (``support_avx512bf16_for_cpu``,
    read from the CPU in ``Linear4bit.__init__``), whatever its compute dtype: references set the switch off, so
    they take the same path, and compare at the same tolerances, with and without that CPU feature."""
    import bitsandbytes as bnb

    has_layout = hasattr(bnb.functional, "_convert_weight_packed_for_cpu")  # (older bitsandbytes: no such path)
    for layer in [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]:
        assert hasattr(layer, "support_avx512bf16_for_cpu") or not has_layout, "bitsandbytes renamed its CPU-kernel switch"
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "already in the bf16 layout"
        layer.support_avx512bf16_for_cpu = False
    return model
