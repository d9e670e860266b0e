"""OFT against PEFT's OFT: logits, gradients, files both ways, fold and unfold, block sizes, COFT, block sharing."""

import contextlib

import pytest
import torch
from peft import OFTConfig, get_peft_model

from surgeon.checkpoints.peft import rules_from_peft
from surgeon.methods.peft_format import AdapterError
from surgeon.capture.demos import build_demo
from surgeon.methods import get_method

from .._peft_reference import inputs
from ._checks import (
    check_diagnostic_codes,
    CompiledCases,
    check_files_both_ways_fold_and_unfold,
    check_logits_and_gradients,
    check_starts_at_the_base,
    copy_into_peft,
    randomize_all,
)

CASES = {
    # PEFT's defaults (the Cayley-Neumann series, 5 terms) with block_size given; an embedding rotates its output
    "llama": ("llama", 'match "model.embed_tokens", "*.self_attn.{q,v}_proj" apply oft(block_size=16)', dict(oft_block_size=16, target_modules=["embed_tokens", "q_proj", "v_proj"])),
    # r given, the exact Cayley transform, a 1024-wide input
    "llama_exact": ("llama", 'match "*.mlp.down_proj", "*.self_attn.o_proj" apply oft(r=4, neumann=false)', dict(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=["down_proj", "o_proj"])),
    # a block size dividing neither 64 nor 256 (PEFT takes 8), one shared block, 7 terms, and constrained OFT
    "bert": (
        "bert",
        'match "*.attention.self.{query,value}", "*.output.dense" apply oft(block_size=12, block_share=true, neumann_terms=7, coft=true, eps=0.3)',
        dict(oft_block_size=12, block_share=True, num_cayley_neumann_terms=7, coft=True, eps=0.3, target_modules=["query", "value", "output.dense"]),
    ),
}
STD = {"llama": 0.05, "llama_exact": 0.2, "bert": 0.05}

@pytest.fixture(scope="module")
def compiled_oft():
    return CompiledCases(CASES)


def _peft(case):
    demo, _, peft_kwargs = CASES[case]
    return get_peft_model(build_demo(demo), OFTConfig(**peft_kwargs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_oft_starts_at_the_base_and_matches_peft_logits_and_gradients(compiled_oft, case):
    demo = CASES[case][0]
    compiled = compiled_oft(case)
    check_starts_at_the_base(compiled, demo)
    randomize_all(compiled, std=STD[case])
    if case == "bert":  # half the sites below COFT's radius, so that both sides of the projection are used
        with torch.no_grad():
            for _, _, module in list(compiled.sites())[::2]:
                module.oft_R.mul_(1e-3)
    with pytest.warns(UserWarning) if case == "bert" else contextlib.nullcontext():  # PEFT warns that it adjusts 12 to 8
        reference = _peft(case)
    copy_into_peft(compiled, reference).eval()
    modules = dict(reference.named_modules())
    for plan_site, (_, path, module) in zip(compiled.plan.sites, compiled.sites()):
        theirs = modules[f"base_model.model.{path}"]
        rotation = (theirs.oft_embedding_R if module.kind == "embedding" else theirs.oft_R)["default"]
        assert module.oft_R.shape == rotation.weight.shape  # PEFT's r and block size, derived the same way
        assert (module.blocks, module.size) == (theirs.r["default"], theirs.oft_block_size["default"])
        assert plan_site.trainable_params == rotation.weight.numel()
    check_logits_and_gradients(compiled, reference, demo)
    if case == "bert":  # both projected their parameters in place, to the same values
        for _, path, module in compiled.sites():
            torch.testing.assert_close(module.oft_R, modules[f"base_model.model.{path}"].oft_R["default"].weight)


def test_oft_files_both_ways_fold_and_unfold(compiled_oft, tmp_path):
    compiled = compiled_oft("llama")
    randomize_all(compiled, seed=4, std=STD["llama"])
    check_files_both_ways_fold_and_unfold(compiled, "llama", "oft", tmp_path)


@pytest.mark.parametrize("case", ["llama", "llama_exact"])
def test_oft_fold_is_peft_merge_and_attach_matches_the_graph(compiled_oft, case):
    compiled = compiled_oft(case)
    randomize_all(compiled, seed=5, std=STD[case])
    reference = copy_into_peft(compiled, _peft(case)).eval()
    merged = reference.merge_and_unload()
    ours = compiled.merged_state_dict()
    for _, path, _ in compiled.sites():
        torch.testing.assert_close(ours[f"{path}.weight"], merged.get_submodule(path).weight, rtol=0, atol=1e-6)
    handles = compiled.attach()
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled.base_model(**inputs()).logits, compiled(**inputs()).logits, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_oft_arguments_are_checked_by_the_language():
    check_diagnostic_codes(
        (
            ('match "x" apply oft(r=0)', "out-of-range"),
            ('match "x" apply oft(block_size=-2)', "out-of-range"),
            ('match "x" apply oft(r=4, block_size=8)', "bad-argument"),
            ('match "x" apply oft(neumann_terms=0)', "out-of-range"),
            ('match "x" apply oft(coft=1)', "bad-type"),
            ('match "x" apply oft(alpha=2)', "unknown-argument"),
        )
    )


def test_oft_reads_peft_configs_and_refuses_what_it_does_not_implement():
    base = dict(peft_type="OFT", target_modules=["q_proj"], r=0, oft_block_size=32, peft_version="0.21.2")
    assert rules_from_peft(base).splitlines()[1] == 'match "q_proj", "*.q_proj" apply oft(block_size=32)'
    coft = dict(base, r=4, oft_block_size=0, coft=True, eps=1e-4, block_share=True, use_cayley_neumann=False, module_dropout=0.1)
    assert rules_from_peft(coft).splitlines()[1].endswith("apply oft(r=4, coft=true, eps=0.0001, block_share=true, neumann=false)")
    assert "type(Linear)" in rules_from_peft(dict(base, target_modules="all-linear"))
    for bad in (dict(base, bias="all"), dict(base, r=4), dict(base, oft_block_size=0)):
        with pytest.raises(AdapterError):
            rules_from_peft(bad)
    with pytest.warns(UserWarning, match="0.18.0"):  # PEFT too warns: its series changed then
        rules_from_peft(dict(base, peft_version="0.17.1"))


def test_oft_leaves_gpt2_conv1d_alone_as_peft_does():
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(build_demo("gpt2"), OFTConfig(target_modules=["c_attn"]))
    assert get_method("oft").sites == ("linear", "embedding")
