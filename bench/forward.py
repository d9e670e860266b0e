"""Forward time of a compiled (unmerged) LoRA model against the base model and PEFT, same run.

    python bench/forward.py [--size small|medium] [--repeats 15] [--threads 2] [--out result.json]

Model: a Llama-shaped causal LM from a transformers config (medium: hidden
1024, MLP 2816, 4 layers, 16 heads, vocab 32000; batch 4 x seq 128), float32
on CPU, eval mode, no grad. LoRA r=8, alpha=16 on every linear layer but
lm_head, with non-zero adapter weights. Each configuration is timed in turn
within every round (so drift hits all alike), after a warm-up; the table
reports medians and ratios against the base model and against PEFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SIZES = {
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, vocab_size=8000, batch=2, seq=64),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, vocab_size=32000, batch=4, seq=128),
}
RULES = 'match type(Linear) where not name("lm_head") apply lora(r=8, alpha=16)'


def build(size: str):
    import transformers

    shape = dict(SIZES[size])
    batch, seq = shape.pop("batch"), shape.pop("seq")
    config = transformers.LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=2 * seq)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, config, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import copy

    from peft import LoraConfig, get_peft_model

    import surgeon

    base, config, inputs = build(args.size)
    compiled = surgeon.compile(copy.deepcopy(base), RULES, example_inputs=inputs).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, w in compiled.sites():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=generator) * 0.01)
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for _, path, w in compiled.sites():
            modules[f"base_model.model.{path}"].lora_A["default"].weight.copy_(w.lora_A)
            modules[f"base_model.model.{path}"].lora_B["default"].weight.copy_(w.lora_B)
    folded = compiled.fold(kwargs=inputs)
    graph = compiled.graph(**inputs)

    runs = {
        "base (eager)": lambda: base(**inputs),
        "surgeon (unmerged graph)": lambda: graph(**inputs),
        "peft (unmerged)": lambda: reference(**inputs),
        "surgeon (folded graph)": lambda: folded(**inputs),
    }
    with torch.no_grad():
        expected = reference(**inputs).logits
        error = (graph(**inputs).logits - expected).abs().max().item()
        times = {name: [] for name in runs}
        for _ in range(3):  # warm-up
            for fn in runs.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    base_t, peft_t = median["base (eager)"], median["peft (unmerged)"]
    print(f"forward, {args.size} Llama ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params), "
          f"batch {inputs['input_ids'].shape[0]} x seq {inputs['input_ids'].shape[1]}, {args.threads} threads, "
          f"{args.repeats} rounds; max |surgeon - peft| logits = {error:.2e}")
    print(f"{'configuration':<26} {'median ms':>10} {'/ base':>8} {'/ peft':>8}")
    for name, t in median.items():
        print(f"{name:<26} {t * 1e3:10.2f} {t / base_t:8.3f} {t / peft_t:8.3f}")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "threads": args.threads, "median_seconds": median, "max_abs_error": error}, indent=2))


if __name__ == "__main__":
    main()
