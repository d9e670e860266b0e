"""The fold contract (surgeon/compiled/merged_model.py, surgeon/compiled/checked_fold.py): a folded model is called like the base model,
an in-place fold leaves the compiled model computing what it did, trained modules are written into the model
as PEFT's merge_and_unload writes them, every merged artifact comes from the one verified fold, and
torch.compile(fullgraph=True) works on a compiled model's first call."""

import inspect

import pytest
import torch
from peft import PeftModel
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForCausalLM

import surgeon
from surgeon.capture.demos import build_demo
from surgeon.passes import FoldError, PassResult

from ._peft_reference import inputs, randomize_adapters

RULES = 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)\nmatch "lm_head" train\n'


def _trained(rules=RULES, seed=0):
    compiled = surgeon.compile("demo:llama", rules).eval()
    randomize_adapters(compiled, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in compiled.trained.values():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return compiled


@pytest.fixture(scope="module")
def trained():
    return _trained()


def test_the_folded_model_takes_the_base_models_keywords_and_gives_its_output_class(trained):
    plain = inputs(labels=False)  # no labels, no use_cache: the keywords a user passes
    with torch.no_grad():
        expected = trained(**plain)
        with_labels = trained(**inputs())
    folded = trained.fold()
    assert inspect.signature(folded.forward) == inspect.signature(trained.base_model.forward)
    with torch.no_grad():
        got = folded(**plain)
        got_with_labels = folded(**inputs())
        positional = folded(plain["input_ids"])
    assert type(got) is type(expected)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_with_labels.loss, with_labels.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(positional.logits, expected.logits, rtol=1e-4, atol=1e-5)
    # one set of merged tensors for every call signature
    weights = [dict(g.named_parameters())["model.layers.0.self_attn.q_proj.weight"] for g in folded._graphs.values()]
    assert len(weights) == 3 and all(w is weights[0] for w in weights)


def test_a_folded_model_does_not_change_when_training_goes_on(trained):
    folded = trained.fold()
    with torch.no_grad():
        before = folded(**inputs(labels=False)).logits
        saved = {n: p.clone() for n, p in trained.named_parameters() if p.requires_grad}
        try:
            for p in saved:
                trained.get_parameter(p).add_(1.0)
            torch.testing.assert_close(folded(**inputs(labels=False)).logits, before)  # its graph, made before
            torch.testing.assert_close(folded(input_ids=inputs()["input_ids"]).logits, before)  # a new graph, same tensors
        finally:
            for n, value in saved.items():
                trained.get_parameter(n).copy_(value)


def test_an_inplace_fold_keeps_the_compiled_models_outputs_and_refuses_a_second_fold():
    compiled = _trained()
    x = inputs(labels=False)
    with torch.no_grad():
        expected = compiled(**x).logits
    before = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    merged = compiled.fold(inplace=True)
    assert merged is compiled.base_model and compiled.folded_in_place
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, expected, rtol=1e-4, atol=1e-5)  # no adapter on top
        torch.testing.assert_close(merged(**x).logits, expected, rtol=1e-4, atol=1e-5)  # the user's model, merged
        torch.testing.assert_close(compiled.fold()(**x).logits, expected, rtol=1e-4, atol=1e-5)  # not merged twice
    with pytest.raises(FoldError, match="folded into the base weights already"):
        compiled.fold(inplace=True)
    with pytest.raises(surgeon.SurgeryError, match="unfold"):
        compiled.export("never.pt2", fold=False)
    compiled.unfold()
    assert not compiled.folded_in_place
    for k, v in compiled.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        torch.testing.assert_close(compiled(**x).logits, expected, rtol=1e-6, atol=1e-6)


def test_an_inplace_fold_of_a_deep_mlp_keeps_its_outputs():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh()) for _ in range(12)])
    x = torch.randn(4, 32)
    compiled = surgeon.compile(mlp, 'match type(Linear) apply lora(r=4, alpha=8)', example_inputs=(x,)).eval()
    with torch.no_grad():
        for _, _, module in compiled.sites():
            module.lora_B.normal_(std=0.1)
        expected = compiled(x)
        compiled.fold(inplace=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mlp(x), expected, rtol=1e-4, atol=1e-5)


def test_an_inplace_fold_writes_the_trained_modules_into_the_model_as_pefts_merge_and_unload(tmp_path):
    compiled = _trained(seed=4)
    compiled.save_adapter(tmp_path / "adapter")
    reference = PeftModel.from_pretrained(build_demo("llama"), tmp_path / "adapter").eval().merge_and_unload()
    model = compiled.fold(inplace=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, reference(**inputs()).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(model.lm_head.weight, compiled.trained["lm_head"].weight)
    compiled.unfold()
    assert not torch.equal(model.lm_head.weight, compiled.trained["lm_head"].weight)


def test_the_merged_checkpoint_is_the_verified_folds_and_replaces_the_folder_whole(trained, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json", "notes.txt"):
        (out / stale).write_text("from an earlier save")
    trained.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    state = trained.fold().state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, trained(**inputs()).logits, rtol=1e-4, atol=1e-5)


def test_a_merged_checkpoint_is_verified_like_every_fold(tmp_path):
    def corrupt(gm):  # a user pass after the fold that changes a merged weight
        with torch.no_grad():
            gm.get_submodule("model.layers.0.self_attn.q_proj").weight.mul_(3.0)
        return PassResult(gm, True)

    compiled = surgeon.compile("demo:llama", RULES, passes={"after_fold": [corrupt]}).eval()
    randomize_adapters(compiled)
    with pytest.raises(FoldError, match="folding changed the outputs"):
        compiled.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_torch_compile_fullgraph_works_on_the_first_call():
    torch._dynamo.reset()
    compiled = surgeon.compile("demo:llama", 'match "*.self_attn.{q,v}_proj" apply lora(r=4)')
    counter = CompileCounterWithBackend("eager")
    fast = torch.compile(compiled, backend=counter, fullgraph=True)  # no eager call first
    loss = fast(**inputs()).loss
    loss.backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None for _, p in compiled.trainable_parameters())
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs(labels=False)).logits, compiled(**inputs(labels=False)).logits)
    assert counter.frame_count == 2  # the eval graph: one more compile, no break
