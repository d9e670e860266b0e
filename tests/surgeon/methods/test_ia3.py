"""(IA)^3 against PEFT's IA3: logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import IA3Config, get_peft_model

from surgeon.capture.demos import build_demo

from .._peft_reference import inputs
from ._checks import CompiledCases, check_files_both_ways_fold_and_unfold, check_logits_and_gradients, copy_into_peft

CASES = {
    "llama": (
        "llama",
        'match "*.self_attn.{k,v}_proj" apply ia3()\nmatch "*.mlp.down_proj" apply ia3(feedforward=true)',
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    "gpt2": (
        "gpt2",
        'match "*.attn.c_attn" apply ia3()\nmatch "*.mlp.c_proj" apply ia3(feedforward=true)',
        dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
    ),
    "bert": ("bert", 'match "*.attention.self.{key,value}" apply ia3()', dict(target_modules=["key", "value"], feedforward_modules=[])),
}


def _randomize(compiled, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            module.ia3_l.copy_(1 + 0.2 * torch.randn(module.ia3_l.shape, generator=generator))


@pytest.fixture(scope="module")
def compiled_ia3():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ia3_matches_peft_logits_and_gradients(compiled_ia3, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_ia3(case)
    _randomize(compiled)
    reference = copy_into_peft(compiled, get_peft_model(build_demo(demo), IA3Config(**peft_kwargs))).eval()
    modules = dict(reference.named_modules())
    for _, path, module in compiled.sites():  # PEFT's layout: (out, 1), or (1, in) for feed-forward sites
        assert module.ia3_l.shape == modules[f"base_model.model.{path}"].ia3_l["default"].shape
    check_logits_and_gradients(compiled, reference, demo)


def test_ia3_files_both_ways_fold_and_unfold(compiled_ia3, tmp_path):
    compiled = compiled_ia3("gpt2")
    _randomize(compiled, seed=5)
    check_files_both_ways_fold_and_unfold(compiled, "gpt2", "ia3", tmp_path)


def test_ia3_attach_scales_the_eager_model_like_the_graph(compiled_ia3):
    compiled = compiled_ia3("llama")
    _randomize(compiled, seed=7)
    handles = compiled.attach()
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled.base_model(**inputs()).logits, compiled(**inputs()).logits, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()
