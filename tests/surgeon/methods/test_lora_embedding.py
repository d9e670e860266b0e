"""LoRA on embeddings against PEFT: logits, gradients, files both ways (PEFT's full-embedding copy too), fold."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from surgeon.demos import build_demo

from .._peft_reference import inputs
from ._checks import CompiledCases, check_files_both_ways_fold_and_unfold

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
    labels = demo != "bert"
    with torch.no_grad():  # A starts at zero: the base model
        torch.testing.assert_close(compiled(**inputs(labels=labels)).logits, build_demo(demo).eval()(**inputs(labels=labels)).logits, rtol=1e-5, atol=1e-5)
    _randomize(compiled)
    reference = get_peft_model(build_demo(demo), LoraConfig(**peft_kwargs)).eval()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            if module.kind == "embedding":
                layer.lora_embedding_A["default"].copy_(module.lora_A)
                layer.lora_embedding_B["default"].copy_(module.lora_B)
            else:
                layer.lora_A["default"].weight.copy_(module.lora_A)
                layer.lora_B["default"].weight.copy_(module.lora_B)
    ours, theirs = compiled(**inputs(labels=labels)), reference(**inputs(labels=labels))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.logits.square().mean().backward()
    theirs.logits.square().mean().backward()
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        if module.kind == "embedding":
            torch.testing.assert_close(module.lora_A.grad, layer.lora_embedding_A["default"].grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module.lora_B.grad, layer.lora_embedding_B["default"].grad, rtol=1e-5, atol=1e-6)
    compiled.zero_grad()


def test_embedding_lora_files_both_ways_fold_and_unfold(compiled_embedding, tmp_path):
    compiled = compiled_embedding("llama")
    _randomize(compiled, seed=2)
    check_files_both_ways_fold_and_unfold(compiled, "llama", "lora", tmp_path)
