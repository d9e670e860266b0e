"""DoRA against PEFT's use_dora=True: logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from surgeon.demos import build_demo

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
