"""Built-in demo models: tiny but real transformers architectures, offline and deterministic.

On the command line a demo is named ``demo:NAME`` (``surgeon plan demo:llama
examples/rules/llama-lora.surgery``); ``demo:llama-nf4`` is the same model loaded
4-bit through transformers' BitsAndBytesConfig (see QUANTIZED_DEMOS). Each is built from a transformers config
with ``torch.manual_seed(0)``, so every run gets the same weights. They are
small enough for tests and examples, and shaped so that the example rules in
``examples/rules/`` match: 4 layers each, and the Llama MLP is 1024 wide.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["DEMOS", "QUANTIZED_DEMOS", "build_demo", "build_quantized_demo", "demo_config", "quantization_config"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    return config, LlamaForCausalLM


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    return config, Qwen2ForCausalLM


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=0, eos_token_id=0)
    return config, GPT2LMHeadModel


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=256,
        num_labels=2,
    )
    return config, BertForSequenceClassification


# name -> (what it is, builder of (config, model class))
DEMOS: dict[str, tuple[str, Callable]] = {
    "llama": ("LlamaForCausalLM: 4 layers, hidden 64, MLP 1024, GQA 4/2 heads, vocab 1000", _llama),
    "qwen2": ("Qwen2ForCausalLM: 4 layers, hidden 64, MLP 256, GQA 4/2 heads, vocab 1000", _qwen2),
    "gpt2": ("GPT2LMHeadModel: 4 layers, hidden 64, Conv1D projections, tied lm_head, vocab 1000", _gpt2),
    "bert": ("BertForSequenceClassification: 4 layers, hidden 64, 2 labels, vocab 1000", _bert),
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
    import torch
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    kind, *extra = scheme.split("-")
    compute = torch.bfloat16 if "bf16" in extra else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant="dq" in extra,
                              bnb_4bit_compute_dtype=compute)


def build_quantized_demo(name: str, scheme: str):
    """The demo ``name`` quantized as transformers does it: saved, then loaded with a BitsAndBytesConfig."""
    import tempfile

    import torch

    model = build_demo(name)
    with tempfile.TemporaryDirectory(prefix="surgeon-demo-") as folder:
        model.save_pretrained(folder)
        dtype = torch.bfloat16 if scheme.endswith("bf16") else torch.float32
        quantized = type(model).from_pretrained(folder, quantization_config=quantization_config(scheme), dtype=dtype, device_map="cpu")
    return quantized.eval()


def demo_config(name: str):
    """(config, model class) of the demo ``name``."""
    return DEMOS[name][1]()


def build_demo(name: str):
    """The demo model ``name`` with its deterministic weights, in eval mode."""
    import torch

    config, model_class = demo_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    return model.eval()
