"""Compiled.merge: weighted adapters merged into a new one, against PEFT's add_weighted_adapter and exact math."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon
from surgeon.capture.demos import build_demo
from surgeon.grammar import SurgeryError

from ._peft_reference import inputs
from .methods._checks import randomize_all

RULES = ('adapter "math" { match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8) }\n'
         'adapter "code" { match "*.self_attn.{q,k}_proj" apply lora(r=4, alpha=4) }\n')
WEIGHTS = {"math": 0.7, "code": 0.3}


@pytest.fixture(scope="module")
def two():
    compiled = surgeon.compile("demo:llama", RULES).eval()
    randomize_all(compiled, seed=7, std=0.2)
    return compiled


def _logits(compiled):
    with torch.no_grad():
        return compiled(**inputs()).logits


def _peft_twin(compiled):
    peft = get_peft_model(build_demo("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="math")
    peft.add_adapter("code", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj"]))
    modules = dict(peft.named_modules())
    with torch.no_grad():
        for name, path, module in compiled.sites():
            if name in WEIGHTS:
                modules[f"base_model.model.{path}"].lora_A[name].weight.copy_(module.lora_A)
                modules[f"base_model.model.{path}"].lora_B[name].weight.copy_(module.lora_B)
    return peft.eval()


def test_linear_is_exactly_the_weighted_sum_of_the_updates(two):
    two.merge("sum", WEIGHTS, "linear")
    assert {s.config.r for s in two.plan.sites if s.adapter == "sum"} == {4, 8}  # q: both sources; k, v: one
    two.set_active(["math", "code"], weights=[0.7, 0.3])  # y + 0.7 dy_math + 0.3 dy_code, in the graph
    expected = _logits(two)
    two.set_active("sum")
    torch.testing.assert_close(_logits(two), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination, options", [("cat", {}), ("ties", {"density": 0.5}), ("svd", {"svd_rank": 4}), ("magnitude_prune", {"density": 0.6})])
def test_merges_equal_pefts_add_weighted_adapter(two, combination, options):
    name = f"merged_{combination}"
    two.merge(name, WEIGHTS, combination, **options)
    two.set_active(name)
    peft = _peft_twin(two)
    peft.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), name, combination_type=combination, **options)
    peft.set_adapter(name)
    with torch.no_grad():
        torch.testing.assert_close(_logits(two), peft(**inputs()).logits, rtol=1e-5, atol=1e-5)


def test_a_merged_adapter_saves_loads_and_folds(two, tmp_path):
    two.merge("combo", WEIGHTS, "ties", density=0.5)
    two.set_active("combo")
    expected = _logits(two)
    two.save_adapter(tmp_path, adapters=["combo"])
    again = surgeon.compile("demo:llama", adapter=tmp_path / "combo").eval()
    torch.testing.assert_close(_logits(again), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(two.fold()(**inputs(), use_cache=False).logits, expected, rtol=1e-4, atol=1e-5)


def test_merge_errors_are_clear(two):
    with pytest.raises(SurgeryError, match="needs a density"):
        two.merge("x", WEIGHTS, "ties")
    with pytest.raises(SurgeryError, match="no adapter named 'nope'"):
        two.merge("x", {"nope": 1.0})
    with pytest.raises(SurgeryError, match="unknown combination type 'best'"):
        two.merge("x", WEIGHTS, "best")


def test_merge_statements_of_a_rules_file_run_after_the_adapters_are_loaded(two, tmp_path):
    from surgeon.grammar.vocabulary import MERGE_OPTIONS, MERGE_TYPES
    from surgeon.compiled.merge_math import COMBINATIONS

    # the language's table (torch-free) and the math's registry agree
    assert {n: set(p) for n, p in MERGE_TYPES.items()} == {n: set(c.params) for n, c in COMBINATIONS.items()}
    assert set(MERGE_OPTIONS) == set().union(*(c.params for c in COMBINATIONS.values()))
    two.save_adapter(tmp_path, adapters=["math", "code"])
    text = RULES + 'merge "combo" = ties(math=0.7, code=0.3, density=0.5)\n'
    compiled = surgeon.compile("demo:llama", text, adapter=tmp_path).eval()
    assert compiled.adapter_names == ("math", "code", "combo")
    two.merge("combo_api", WEIGHTS, "ties", density=0.5)
    compiled.set_active("combo")
    two.set_active("combo_api")
    torch.testing.assert_close(_logits(compiled), _logits(two), rtol=1e-6, atol=1e-6)
    with pytest.raises(SurgeryError, match=r"<rules>:3:1: error: merge 'x': no adapter named 'other'"):
        surgeon.compile("demo:llama", RULES + 'merge "x" = linear(other=1.0)\n')


def test_the_merge_command_writes_peft_adapters(two, tmp_path):
    from peft import PeftModel

    from surgeon.cli import main

    two.save_adapter(tmp_path / "in", adapters=["math", "code"])
    assert main(["merge", "demo:llama", str(tmp_path / "in"), "combo=ties(math=0.7, code=0.3, density=0.5)", "-o", str(tmp_path / "out")]) == 0
    two.merge("combo_cli", WEIGHTS, "ties", density=0.5)
    two.set_active("combo_cli")
    theirs = PeftModel.from_pretrained(build_demo("llama"), tmp_path / "out" / "combo").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs()).logits, _logits(two), rtol=1e-5, atol=1e-5)
    assert main(["merge", "demo:llama", str(tmp_path / "in"), "combo=tie(math=1)", "-o", str(tmp_path / "bad")]) == 1


def test_a_merge_starts_inactive_and_never_replaces_silently(two):
    two.set_active(["math", "code"])
    two.merge("fresh", WEIGHTS, "cat")
    assert two.active_adapters == ("math", "code")  # running it with its sources would count them twice
    with pytest.raises(SurgeryError, match="an adapter of that name exists"):
        two.merge("fresh", WEIGHTS, "linear")
    two.merge("fresh", WEIGHTS, "linear", replace=True)
