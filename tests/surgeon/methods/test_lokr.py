"""LoKr against PEFT's LOKR: shapes, logits, gradients, files both ways, fold and unfold."""

import pytest
from peft import LoKrConfig, get_peft_model

from surgeon.capture.demos import build_demo
from surgeon.methods.lokr import factorization

from ._checks import (
    CompiledCases,
    check_files_both_ways_fold_and_unfold,
    check_logits_and_gradients,
    check_starts_at_the_base,
    check_training_draws_match,
    copy_into_peft,
    randomize_all,
)

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


PEFT_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


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
    check_starts_at_the_base(compiled, demo)
    randomize_all(compiled)
    reference = get_peft_model(build_demo(demo), LoKrConfig(**peft_kwargs)).eval()
    modules = dict(reference.named_modules())
    for _, path, module in compiled.sites():  # the same factors, decomposed the same way
        layer = modules[f"base_model.model.{path}"]
        theirs = {n: tuple(getattr(layer, n)["default"].shape) for n in PEFT_NAMES if "default" in getattr(layer, n)}
        assert theirs == {n: tuple(p.shape) for n, p in module.peft_state().items()}
    check_logits_and_gradients(compiled, copy_into_peft(compiled, reference), demo)


def test_lokr_files_both_ways_fold_and_unfold(compiled_lokr, tmp_path):
    compiled = compiled_lokr("llama decompose_both")
    randomize_all(compiled, seed=9)
    check_files_both_ways_fold_and_unfold(compiled, "llama", "lokr", tmp_path)


@pytest.mark.parametrize("dropouts", [dict(rank_dropout=0.3, rank_dropout_scale=True), dict(rank_dropout=0.3), dict(module_dropout=0.5)])
def test_lokr_training_dropouts_draw_as_peft(dropouts):
    import surgeon

    arguments = ", ".join(f"{k}={str(v).lower()}" for k, v in dropouts.items())
    compiled = surgeon.compile("demo:llama", f'match "*.self_attn.{{q,v}}_proj" apply lokr(r=2, alpha=4, {arguments})')
    randomize_all(compiled)
    reference = get_peft_model(build_demo("llama"), LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], **dropouts))
    check_training_draws_match(compiled, copy_into_peft(compiled, reference), "llama")
