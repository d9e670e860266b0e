"""LoRA on embeddings against PEFT: logits, gradients, files both ways (PEFT's full-embedding copy too), fold."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from surgeon.capture.demos import build_demo

from ._checks import (
    CompiledCases,
    check_files_both_ways_fold_and_unfold,
    check_logits_and_gradients,
    check_starts_at_the_base,
    copy_into_peft,
)

CASES = {
    "llama": ("llama", 'match "model.embed_tokens" apply lora(r=4, alpha=8)\nmatch "*.q_proj" apply lora(r=4, alpha=8)', dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "bert": ("bert", 'match "*.word_embeddings" apply lora(r=2, alpha=2)', dict(r=2, lora_alpha=2, target_modules=["word_embeddings"])),
}


def _randomize(compiled, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def compiled_embedding():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_embedding_lora_matches_peft(compiled_embedding, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_embedding(case)
    check_starts_at_the_base(compiled, demo)  # A starts at zero
    _randomize(compiled)
    reference = copy_into_peft(compiled, get_peft_model(build_demo(demo), LoraConfig(**peft_kwargs))).eval()
    check_logits_and_gradients(compiled, reference, demo)


def test_embedding_lora_files_both_ways_fold_and_unfold(compiled_embedding, tmp_path):
    compiled = compiled_embedding("llama")
    _randomize(compiled, seed=2)
    check_files_both_ways_fold_and_unfold(compiled, "llama", "lora", tmp_path)
