"""LoHa against PEFT's LOHA: logits, gradients, files both ways, fold and unfold."""

import pytest
from peft import LoHaConfig, get_peft_model

from surgeon.capture.demos import build_demo

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
    "llama": ("llama", 'match "*.self_attn.{q,v}_proj" apply loha(r=4, alpha=8)\nmatch "*.layers.3.*" skip', dict(r=4, alpha=8, target_modules=r".*layers\.[012]\.self_attn\.(q|v)_proj")),
    "bert": ("bert", 'match "*.attention.self.query" apply loha(r=2, alpha=4)\nmatch "*.intermediate.dense" apply loha(r=4, alpha=4)', dict(r=2, alpha=4, target_modules=["query", "intermediate.dense"], rank_pattern={"dense": 4}, alpha_pattern={"dense": 4})),
}


@pytest.fixture(scope="module")
def compiled_loha():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_loha_starts_at_the_base_and_matches_peft_logits_and_gradients(compiled_loha, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_loha(case)
    check_starts_at_the_base(compiled, demo)
    randomize_all(compiled)
    reference = copy_into_peft(compiled, get_peft_model(build_demo(demo), LoHaConfig(**peft_kwargs))).eval()
    modules = dict(reference.named_modules())
    assert all(modules[f"base_model.model.{p}"].scaling["default"] == m.scale for _, p, m in compiled.sites())
    check_logits_and_gradients(compiled, reference, demo)


def test_loha_files_both_ways_fold_and_unfold(compiled_loha, tmp_path):
    compiled = compiled_loha("llama")
    randomize_all(compiled, seed=4)
    check_files_both_ways_fold_and_unfold(compiled, "llama", "loha", tmp_path)

@pytest.mark.parametrize("dropouts", [dict(rank_dropout=0.3), dict(module_dropout=0.5)])
def test_loha_training_dropouts_draw_as_peft(dropouts, tmp_path):
    import surgeon

    arguments = ", ".join(f"{k}={v}" for k, v in dropouts.items())
    compiled = surgeon.compile("demo:llama", f'match "*.self_attn.{{q,v}}_proj" apply loha(r=4, alpha=8, {arguments})')
    randomize_all(compiled)
    reference = get_peft_model(build_demo("llama"), LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], **dropouts))
    check_training_draws_match(compiled, copy_into_peft(compiled, reference), "llama")
    compiled.save_adapter(tmp_path)
    again = surgeon.compile("demo:llama", adapter=tmp_path)
    assert [s.config for s in again.plan.sites] == [s.config for s in compiled.plan.sites]
