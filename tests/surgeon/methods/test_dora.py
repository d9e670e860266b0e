"""DoRA against PEFT's use_dora=True: logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from surgeon.capture.demos import build_demo

from .._peft_reference import randomize_adapters
from ._checks import (
    CompiledCases,
    check_files_both_ways_fold_and_unfold,
    check_logits_and_gradients,
    check_starts_at_the_base,
    copy_into_peft,
)

CASES = {
    "llama": ("llama", 'match "*.self_attn.{q,v}_proj" apply dora(r=8, alpha=16)\nmatch "*.layers.0.*" skip', dict(target_modules=r".*layers\.[123]\.self_attn\.(q|v)_proj")),
    "gpt2": ("gpt2", 'match "*.c_attn", "*.mlp.c_fc" apply dora(r=4, alpha=8)', dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert": ("bert", 'match "*.attention.self.{query,value}" apply dora(r=4, alpha=8)', dict(target_modules=["query", "value"])),
}


def _randomize(compiled, seed=0):
    randomize_adapters(compiled, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            module.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(module.lora_magnitude_vector.shape, generator=generator))


@pytest.fixture(scope="module")
def compiled_dora():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_starts_equal_to_the_base_then_matches_peft_logits_and_gradients(compiled_dora, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_dora(case)
    check_starts_at_the_base(compiled, demo)  # magnitude = ||W||, B = 0: the base model exactly
    _randomize(compiled)
    first = next(iter(compiled.sites()))[2]
    config = LoraConfig(r=first.config.r, lora_alpha=first.config.alpha, use_dora=True, **peft_kwargs)
    reference = copy_into_peft(compiled, get_peft_model(build_demo(demo), config)).eval()
    check_logits_and_gradients(compiled, reference, demo)


def test_dora_files_both_ways_fold_and_unfold(compiled_dora, tmp_path):
    compiled = compiled_dora("gpt2")
    _randomize(compiled, seed=3)
    check_files_both_ways_fold_and_unfold(compiled, "gpt2", "dora", tmp_path)


def test_lowered_dora_sites_call_the_fused_op_and_equal_the_graph_branch(compiled_dora):
    """The lowering pass (passes/lower.py) against the plain graph it replaces, gate 1 and 0.4, outputs and
    every adapter gradient; on CPU the op runs its torch path (the kernels: tests/kernels/interpreted_parity.py)."""
    compiled = compiled_dora("llama")
    _randomize(compiled, seed=5)
    batch = {"input_ids": torch.arange(14).reshape(2, 7) * 5 + 3, "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    kwargs = compiled.with_defaults(dict(batch))
    params = [p for _, _, module in compiled.sites() for p in module.parameters()]
    lowered, plain = (compiled.graph(training=True, lowered=flag, **batch) for flag in (True, False))
    assert sum(n.target is torch.ops.surgeon.dora_linear.default for n in lowered.graph.nodes) == 6  # q, v of layers 1-3
    try:
        for gate in (1.0, 0.4):
            compiled.set_gates({"default": gate})
            results = []
            for graph in (lowered, plain):
                logits = graph(**kwargs).logits
                results.append((logits, torch.autograd.grad(logits.square().sum(), params)))
            (ours, our_grads), (theirs, their_grads) = results
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            for mine, reference in zip(our_grads, their_grads):
                torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    finally:
        compiled.set_gates({"default": 1.0})
