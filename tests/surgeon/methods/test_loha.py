"""LoHa against PEFT's LOHA: logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import LoHaConfig, get_peft_model

from surgeon.demos import build_demo

from .._peft_reference import inputs
from ._checks import CompiledCases, check_files_both_ways_fold_and_unfold, randomize_all

CASES = {
    "llama": ("llama", 'match "*.self_attn.{q,v}_proj" apply loha(r=4, alpha=8)\nmatch "*.layers.3.*" skip', dict(r=4, alpha=8, target_modules=r".*layers\.[012]\.self_attn\.(q|v)_proj")),
    "bert": ("bert", 'match "*.attention.self.query" apply loha(r=2, alpha=4)\nmatch "*.intermediate.dense" apply loha(r=4, alpha=4)', dict(r=2, alpha=4, target_modules=["query", "intermediate.dense"], rank_pattern={"dense": 4}, alpha_pattern={"dense": 4})),
}


def _peft_twin(compiled, demo, **kwargs):
    model = get_peft_model(build_demo(demo), LoHaConfig(**kwargs))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                getattr(layer, name)["default"].copy_(getattr(module, name))
            assert layer.scaling["default"] == module.scale
    return model


@pytest.fixture(scope="module")
def compiled_loha():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loha_starts_at_the_base_and_matches_peft_logits_and_gradients(compiled_loha, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_loha(case)
    labels = demo != "bert"
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs(labels=labels)).logits, build_demo(demo).eval()(**inputs(labels=labels)).logits, rtol=1e-5, atol=1e-5)
    randomize_all(compiled)
    reference = _peft_twin(compiled, demo, **peft_kwargs).eval()
    ours, theirs = compiled(**inputs(labels=labels)), reference(**inputs(labels=labels))
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.logits.square().mean().backward()
    theirs.logits.square().mean().backward()
    modules = dict(reference.named_modules())
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            torch.testing.assert_close(getattr(module, name).grad, getattr(layer, name)["default"].grad, rtol=1e-5, atol=1e-6)
    compiled.zero_grad()


def test_loha_files_both_ways_fold_and_unfold(compiled_loha, tmp_path):
    compiled = compiled_loha("llama")
    randomize_all(compiled, seed=4)
    check_files_both_ways_fold_and_unfold(compiled, "llama", "loha", tmp_path)