"""Trainable tokens against PEFT's TRAINABLE_TOKENS: logits, gradients, tied lm_head, files both ways, fold, unfold."""

import pytest
import torch
from peft import TrainableTokensConfig, get_peft_model

import surgeon
from surgeon.capture.demos import build_demo
from surgeon.grammar import SurgeryError

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

INDICES = [3, 10, 17, 24, 500]  # ids 3, 10, 17, 24 occur in the test inputs; 500 does not
CASES = {
    "llama": ("llama", f'match "model.embed_tokens" apply trainable_tokens(indices={INDICES})', dict(token_indices=INDICES)),
    "gpt2 tied": ("gpt2", f'match "*.wte" apply trainable_tokens(indices={INDICES})', dict(token_indices=INDICES)),
    "bert": ("bert", f'match "*.word_embeddings" apply trainable_tokens(indices={INDICES})', dict(token_indices=INDICES)),
}


@pytest.fixture(scope="module")
def compiled_tokens():
    return CompiledCases(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_tokens_start_at_the_base_and_match_peft_logits_and_gradients(compiled_tokens, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_tokens(case)
    check_starts_at_the_base(compiled, demo)
    randomize_all(compiled)
    reference = copy_into_peft(compiled, get_peft_model(build_demo(demo), TrainableTokensConfig(**peft_kwargs))).eval()
    check_logits_and_gradients(compiled, reference, demo)


def test_the_tied_lm_head_reads_the_trained_rows(compiled_tokens):
    """GPT-2 ties lm_head to wte: the logits of a trained token change through the head too, as in PEFT."""
    compiled = compiled_tokens("gpt2 tied")
    randomize_all(compiled, seed=1)
    graph = compiled.graph(**inputs())
    linear = [n for n in graph.graph.nodes if n.target is torch.ops.aten.linear.default and "lm_head" in str(n.meta.get("nn_module_stack"))]
    assert [n.args[1].target for n in linear] == [torch.ops.aten.index_copy.default]
    # Only the listed rows differ from the base embedding; the unlisted token's logit column is the base one.
    base = build_demo("gpt2").eval()
    with torch.no_grad():
        ours, theirs = compiled(**inputs()).logits, base(**inputs()).logits
    assert not torch.allclose(ours[..., 3], theirs[..., 3])


def test_trainable_tokens_train_only_their_rows():
    compiled = surgeon.compile("demo:llama", CASES["llama"][1])
    (name, rows), = compiled.trainable_parameters()
    assert rows.shape == (len(INDICES), 64) and name.endswith("trainable_tokens_delta")
    assert compiled.plan.totals()["trainable_params"] == len(INDICES) * 64
    before = compiled.base_model.model.embed_tokens.weight.clone()
    optimizer = torch.optim.SGD([rows], lr=0.5)
    compiled.train()
    loss = compiled(**inputs()).loss
    loss.backward()
    optimizer.step()
    assert torch.equal(compiled.base_model.model.embed_tokens.weight, before)  # the base never changes
    merged = compiled.merged_state_dict()["model.embed_tokens.weight"]
    changed = (merged != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == INDICES[:4]  # token 500 got no gradient


@pytest.mark.parametrize("case", ["llama", "gpt2 tied"])
def test_trainable_tokens_files_both_ways_fold_and_unfold(compiled_tokens, case, tmp_path):
    compiled = compiled_tokens(case)
    randomize_all(compiled, seed=4)
    check_files_both_ways_fold_and_unfold(compiled, CASES[case][0], "trainable_tokens", tmp_path)


def test_trainable_tokens_arguments_are_checked():
    check_diagnostic_codes(
        (
            ('match "x" apply trainable_tokens(indices=[-1])', "out-of-range"),
            ('match "x" apply trainable_tokens(indices=[1, 2, 1])', "bad-argument"),
            ('match "x" apply trainable_tokens(indices=[])', "bad-argument"),
            ('match "x" apply trainable_tokens()', "missing-argument"),
        )
    )


def test_a_token_id_beyond_the_vocabulary_is_a_clear_error():
    with pytest.raises(SurgeryError, match="token id 5000 is outside the embedding's 1000 rows"):
        surgeon.compile("demo:llama", 'match "model.embed_tokens" apply trainable_tokens(indices=[5000])')


def test_tied_rows_reach_eager_hooks_and_the_merged_checkpoint(compiled_tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    compiled = compiled_tokens("gpt2 tied")
    randomize_all(compiled, seed=2)
    with torch.no_grad():
        expected = compiled(**inputs()).logits
        eager = build_demo("gpt2").eval()
        handles = compiled.attach(eager)
        torch.testing.assert_close(eager(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)
        for handle in handles:
            handle.remove()
        compiled.save_pretrained(tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)
