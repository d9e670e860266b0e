"""Built-in demo models: tiny but real transformers architectures, offline and deterministic.

On the command line a demo is named ``demo:NAME`` (``surgeon plan demo:llama
examples/rules/llama-lora.surgery``); ``demo:llama-nf4`` is the same model loaded
4-bit through transformers' BitsAndBytesConfig (see QUANTIZED_DEMOS). Each is built from a transformers config
with ``torch.manual_seed(0)``, so every run gets the same weights. They are
small enough for tests and examples, and shaped so that the example rules in
``examples/rules/`` match: 4 layers each, and the Llama MLP is 1024 wide.
transformers is imported when a demo is built (a plain nn.Module needs none of it),
and each model family's code when its classes are first asked for.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch

__all__ = ["Demo", "DEMOS", "QUANTIZED_DEMOS", "build_demo", "build_quantized_demo", "demo_config", "quantization_config"]


@dataclass(frozen=True)
class Demo:
    """A demo: what it is, and its transformers config and model classes (by name) with the config's fields."""

    summary: str
    config_class: str
    model_class: str
    fields: dict


_SMALL = dict(num_hidden_layers=4, num_attention_heads=4, vocab_size=1000, max_position_embeddings=256)
DEMOS: dict[str, Demo] = {
    "llama": Demo("LlamaForCausalLM: 4 layers, hidden 64, MLP 1024, GQA 4/2 heads, vocab 1000", "LlamaConfig",
                  "LlamaForCausalLM", dict(_SMALL, hidden_size=64, intermediate_size=1024, num_key_value_heads=2)),
    "qwen2": Demo("Qwen2ForCausalLM: 4 layers, hidden 64, MLP 256, GQA 4/2 heads, vocab 1000", "Qwen2Config",
                  "Qwen2ForCausalLM", dict(_SMALL, hidden_size=64, intermediate_size=256, num_key_value_heads=2)),
    "gpt2": Demo("GPT2LMHeadModel: 4 layers, hidden 64, Conv1D projections, tied lm_head, vocab 1000", "GPT2Config",
                 "GPT2LMHeadModel", dict(n_embd=64, n_layer=4, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=0,
                                         eos_token_id=0)),
    "bert": Demo("BertForSequenceClassification: 4 layers, hidden 64, 2 labels, vocab 1000", "BertConfig",
                 "BertForSequenceClassification", dict(_SMALL, hidden_size=64, intermediate_size=256, num_labels=2)),
}


# -QUANT suffixes: the demo loaded through transformers' BitsAndBytesConfig (bitsandbytes, CPU or GPU)
QUANTIZED_DEMOS = {
    "nf4": "4-bit NF4, float32 compute",
    "fp4": "4-bit FP4, float32 compute",
    "nf4-dq-bf16": "4-bit NF4 with double quantization, bfloat16 compute and model",
    "int8": "LLM.int8 (8-bit rows, outlier threshold 6)",
}


def quantization_config(scheme: str):
    """The ``BitsAndBytesConfig`` of a demo suffix (see QUANTIZED_DEMOS)."""
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    kind, *extra = scheme.split("-")
    compute = torch.bfloat16 if "bf16" in extra else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant="dq" in extra,
                              bnb_4bit_compute_dtype=compute)


def build_quantized_demo(name: str, scheme: str):
    """The demo ``name`` quantized as transformers does it: saved, then loaded with a BitsAndBytesConfig."""
    model = build_demo(name)
    with tempfile.TemporaryDirectory(prefix="surgeon-demo-") as folder:
        model.save_pretrained(folder)
        dtype = torch.bfloat16 if scheme.endswith("bf16") else torch.float32
        quantized = type(model).from_pretrained(folder, quantization_config=quantization_config(scheme), dtype=dtype, device_map="cpu")
    return quantized.eval()


def demo_config(name: str):
    """(config, model class) of the demo ``name``."""
    import transformers

    demo = DEMOS[name]
    return getattr(transformers, demo.config_class)(**demo.fields), getattr(transformers, demo.model_class)


def build_demo(name: str):
    """The demo model ``name`` with its deterministic weights, in eval mode."""
    config, model_class = demo_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    return model.eval()
