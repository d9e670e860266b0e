"""LoRA's PiSSA and OLoRA initialisations against PEFT's: the same A0/B0, logits, gradients, files, fold."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import surgeon
from surgeon.capture.demos import build_demo
from surgeon.grammar import SurgeryError, parse

from .._peft_reference import inputs
from ._checks import (
    CompiledCases,
    check_files_both_ways_fold_and_unfold,
    check_logits_and_gradients,
    check_starts_at_the_base,
    copy_into_peft,
    peft_parameter,
)

CASES = {
    "llama pissa": ("llama", 'match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8, init="pissa")', dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")),
    "llama olora": ("llama", 'match "*.mlp.{up,down}_proj" apply lora(r=4, alpha=4, init="olora")', dict(r=4, lora_alpha=4, target_modules=["up_proj", "down_proj"], init_lora_weights="olora")),
    "gpt2 pissa": ("gpt2", 'match "*.c_attn" apply lora(r=4, alpha=16, init="pissa")', dict(r=4, lora_alpha=16, target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True)),
    "bert olora": ("bert", 'match "*.attention.self.{query,value}" apply lora(r=2, alpha=4, init="olora")', dict(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights="olora")),
}


@pytest.fixture(scope="module")
def compiled_init():
    return CompiledCases(CASES)


def _randomize_adapters(compiled, seed):
    """New A and B (the initial A0, B0 and so the residual base stay as initialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            for p in (module.lora_A, module.lora_B):
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("case", sorted(CASES))
def test_init_equals_pefts_and_matches_its_logits_and_gradients(compiled_init, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_init(case)
    check_starts_at_the_base(compiled, demo)
    reference = get_peft_model(build_demo(demo), LoraConfig(**peft_kwargs)).eval()
    modules = dict(reference.named_modules())
    for _, path, module in compiled.sites():  # PEFT's A0, B0 from the same SVD / QR
        layer = modules[f"base_model.model.{path}"]
        for suffix, tensor in module.peft_state().items():
            torch.testing.assert_close(tensor, peft_parameter(layer, suffix), rtol=1e-5, atol=1e-6)
    _randomize_adapters(compiled, seed=0)
    check_logits_and_gradients(compiled, copy_into_peft(compiled, reference), demo)


@pytest.mark.parametrize("case", ["llama pissa", "gpt2 pissa"])
def test_saved_files_are_plain_lora_right_for_the_untouched_base_and_fold(compiled_init, case, tmp_path):
    """surgeon writes PiSSA as PEFT's conversion (rank 2r on the original base), then the usual round trip."""
    compiled = compiled_init(case)
    _randomize_adapters(compiled, seed=1)
    compiled.save_adapter(tmp_path / "converted")
    config = PeftModel.from_pretrained(build_demo(CASES[case][0]), tmp_path / "converted").peft_config["default"]
    assert config.r == 8 and config.init_lora_weights is True
    check_files_both_ways_fold_and_unfold(compiled, CASES[case][0], "lora", tmp_path)


def test_pefts_own_pissa_files_load_with_the_residual_made_again(tmp_path):
    demo, _, peft_kwargs = CASES["llama olora"]
    theirs = get_peft_model(build_demo(demo), LoraConfig(**peft_kwargs)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
        expected = theirs(**inputs()).logits
    theirs.save_pretrained(tmp_path / "native")
    ours = surgeon.compile(f"demo:{demo}", adapter=tmp_path / "native").eval()
    assert {s.config.init for s in ours.plan.sites} == {"olora"}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)


def test_randomized_pissa_starts_at_the_base_and_saves_correctly(tmp_path):
    compiled = surgeon.compile("demo:llama", 'match "*.self_attn.q_proj" apply lora(r=4, init="pissa_niter_2")').eval()
    check_starts_at_the_base(compiled, "llama")
    _randomize_adapters(compiled, seed=2)
    expected = compiled(**inputs()).logits.detach()
    compiled.save_adapter(tmp_path / "converted")
    theirs = PeftModel.from_pretrained(build_demo("llama"), tmp_path / "converted").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)


def test_init_arguments_are_checked():
    assert parse('match "x" apply lora(r=4, init="pissa_niter_16")').rules[0].action.method.config.init == "pissa_niter_16"
    for text in ('match "x" apply lora(r=4, init="pissa_niter_0")', 'match "x" apply lora(r=4, init="svd")'):
        with pytest.raises(SurgeryError) as caught:
            parse(text)
        assert [d.code for d in caught.value.diagnostics] == ["bad-choice"], text
        assert 'or "pissa_niter_<K>"' in str(caught.value)
    with pytest.raises(SurgeryError, match="needs a Linear site"):
        surgeon.compile("demo:gpt2", 'match "*.c_attn" apply lora(r=4, init="olora")')
