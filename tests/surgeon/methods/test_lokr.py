"""LoKr against PEFT's LOKR: shapes, logits, gradients, files both ways, fold and unfold."""

import pytest
import torch
from peft import LoKrConfig, get_peft_model

from surgeon.demos import build_demo
from surgeon.methods.lokr import factorization

from .._peft_reference import inputs
from ._checks import CompiledCases, check_files_both_ways_fold_and_unfold, randomize_all

CASES = {
    "llama decompose_both": (
        "llama",
        'match "*.self_attn.{q,v}_proj" apply lokr(r=2, alpha=4, decompose_both=true)',
        dict(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "v_proj"]),
    ),
    "llama factor": ("llama", 'match "*.mlp.up_proj" apply lokr(r=8, alpha=8, factor=4)', dict(r=8, alpha=8, decompose_factor=4, target_modules=["up_proj"])),
    "bert ranks": (
        "bert",
        'match "*.attention.self.query" apply lokr(r=8, alpha=8)\nmatch "*.intermediate.dense" apply lokr(r=2, alpha=2)',
        dict(r=8, alpha=8, target_modules=["query", "intermediate.dense"], rank_pattern={"dense": 2}, alpha_pattern={"dense": 2}),
    ),
}


def test_factorization_is_pefts():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in (1, 7, 64, 96, 127, 128, 256, 1000, 1024, 2816, 4096):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.fixture(scope="module")
def compiled_lokr():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lokr_starts_at_the_base_and_matches_peft_shapes_logits_and_gradients(compiled_lokr, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_lokr(case)
    labels = demo != "bert"
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs(labels=labels)).logits, build_demo(demo).eval()(**inputs(labels=labels)).logits, rtol=1e-5, atol=1e-5)
    randomize_all(compiled)
    reference = get_peft_model(build_demo(demo), LoKrConfig(**peft_kwargs)).eval()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for _, path, module in compiled.sites():
            layer = modules[f"base_model.model.{path}"]
            theirs = {n: getattr(layer, n)["default"] for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b") if "default" in getattr(layer, n)}
            assert {n: tuple(p.shape) for n, p in theirs.items()} == {n: tuple(p.shape) for n, p in module.peft_state().items()}
            for name, p in module.peft_state().items():
                theirs[name].copy_(p)
    ours, theirs_out = compiled(**inputs(labels=labels)), reference(**inputs(labels=labels))
    torch.testing.assert_close(ours.logits, theirs_out.logits, rtol=1e-5, atol=1e-5)
    ours.logits.square().mean().backward()
    theirs_out.logits.square().mean().backward()
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        for name, p in module.peft_state().items():
            torch.testing.assert_close(p.grad, getattr(layer, name)["default"].grad, rtol=1e-5, atol=1e-6)
    compiled.zero_grad()


def test_lokr_files_both_ways_fold_and_unfold(compiled_lokr, tmp_path):
    compiled = compiled_lokr("llama decompose_both")
    randomize_all(compiled, seed=9)
    check_files_both_ways_fold_and_unfold(compiled, "llama", "lokr", tmp_path)
