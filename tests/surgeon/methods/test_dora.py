"""DoRA against PEFT's use_dora=True: logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon
from surgeon.demos import build_demo

from .._peft_reference import inputs, randomize_adapters
from ._checks import CompiledCases, check_files_both_ways_fold_and_unfold

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


def _peft_twin(compiled, demo, **kwargs):
    first = next(iter(compiled.sites()))[2]
    model = get_peft_model(build_demo(demo), LoraConfig(r=first.config.r, lora_alpha=first.config.alpha, use_dora=True, **kwargs))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)
            layer.lora_magnitude_vector["default"].weight.copy_(module.lora_magnitude_vector)
    return model


@pytest.fixture(scope="module")
def compiled_dora():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_starts_equal_to_the_base_then_matches_peft_logits_and_gradients(compiled_dora, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_dora(case)
    labels = demo != "bert"
    with torch.no_grad():  # magnitude = ||W||, B = 0: the base model exactly
        torch.testing.assert_close(compiled(**inputs(labels=labels)).logits, build_demo(demo).eval()(**inputs(labels=labels)).logits, rtol=1e-5, atol=1e-5)
    _randomize(compiled)
    reference = _peft_twin(compiled, demo, **peft_kwargs).eval()
    ours, theirs = compiled(**inputs(labels=labels)), reference(**inputs(labels=labels))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.logits.square().mean().backward()
    theirs.logits.square().mean().backward()
    modules = dict(reference.named_modules())
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        torch.testing.assert_close(module.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-5, atol=1e-6)
    compiled.zero_grad()


def test_dora_files_both_ways_fold_and_unfold(compiled_dora, tmp_path):
    compiled = compiled_dora("gpt2")
    _randomize(compiled, seed=3)
    check_files_both_ways_fold_and_unfold(compiled, "gpt2", "dora", tmp_path)


def test_mixing_lora_and_dora_in_one_adapter_trains_folds_but_is_not_peft_format(tmp_path):
    compiled = surgeon.compile("demo:llama", 'match "*.q_proj" apply lora(r=4)\nmatch "*.v_proj" apply dora(r=4)')
    optimizer = torch.optim.AdamW([p for _, p in compiled.trainable_parameters()], lr=1e-2)
    compiled.train()
    losses = []
    for _ in range(4):
        loss = compiled(**inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    compiled.eval()
    compiled.fold()
    from surgeon.checkpoints.peft import AdapterError

    with pytest.raises(AdapterError, match="uses dora and lora: a PEFT adapter holds one method, not a mixture"):
        compiled.save_adapter(tmp_path / "mixed")
