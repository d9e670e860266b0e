"""Many adapters on one graph: switching (against PEFT's set_adapter / disable_adapter), routing per row, weighted folds."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgeon
from surgeon.capture.demos import build_demo
from surgeon.grammar import SurgeryError

from ._peft_reference import inputs
from .methods._checks import randomize_all

RULES = """\
adapter "a" {
  match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8)
}
adapter "b" {
  match "*.self_attn.{q,k}_proj" apply lora(r=8, alpha=8)
  match "*.mlp.down_proj" apply loha(r=2, alpha=4)
}
adapter "c" {
  match "*.mlp.up_proj" apply ia3()
  match "*.self_attn.o_proj" apply dora(r=2, alpha=2)
}
"""


@pytest.fixture(scope="module")
def many():
    compiled = surgeon.compile("demo:llama", RULES).eval()
    randomize_all(compiled, seed=5, std=0.1)
    return compiled


def _logits(compiled, **extra):
    with torch.no_grad():
        return compiled(**inputs(batch=4), **extra).logits


def test_switching_needs_no_new_graph_and_equals_pefts_set_adapter_and_disable(many):
    """Adapters a and b are LoRA only on their LoRA sites: build PEFT's twin with both adapters."""
    compiled = surgeon.compile("demo:llama", 'adapter "a" { match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8) }\n'
                               'adapter "b" { match "*.self_attn.{q,k}_proj" apply lora(r=8, alpha=8) }').eval()
    randomize_all(compiled, seed=1, std=0.1)
    peft = get_peft_model(build_demo("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    peft.add_adapter("b", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj"]))
    modules = dict(peft.named_modules())
    with torch.no_grad():
        for name, path, module in compiled.sites():
            modules[f"base_model.model.{path}"].lora_A[name].weight.copy_(module.lora_A)
            modules[f"base_model.model.{path}"].lora_B[name].weight.copy_(module.lora_B)
    peft.eval()
    graph = compiled.graph(**inputs(batch=4))
    for active in (["a"], ["b"], ["a", "b"]):
        compiled.set_active(active)
        peft.base_model.set_adapter(active)
        with torch.no_grad():
            torch.testing.assert_close(_logits(compiled), peft(**inputs(batch=4)).logits, rtol=1e-5, atol=1e-5)
    with compiled.disabled(), peft.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(_logits(compiled), peft(**inputs(batch=4)).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(compiled), build_demo("llama").eval()(**inputs(batch=4)).logits, rtol=0, atol=0)
    assert compiled.active_adapters == ("a", "b")  # restored after the context
    assert compiled.graph(**inputs(batch=4)) is graph and len(compiled._graphs) == 1  # nothing captured again


def test_only_active_adapters_train(many):
    many.set_active("b")
    assert all(p.requires_grad for p in many.adapters["a"].parameters())  # eval: tensors only (no recompiles)
    many.train()
    assert all(not p.requires_grad for p in many.adapters["a"].parameters())
    assert all(p.requires_grad for p in many.adapters["b"].parameters())
    before = {n: p.detach().clone() for n, p in many.named_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in many.named_parameters()], lr=1e-2, weight_decay=0.1)
    many(**inputs()).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    many.eval()
    changed = {n for n, p in many.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("adapters.b.") for n in changed)
    many.set_active(["a", "b", "c"])


def test_routing_a_mixed_batch_equals_each_row_alone(many):
    ids = torch.tensor([0, 1, -1, 2, 1, 0])
    batch = inputs(batch=6)
    with torch.no_grad():
        routed = many(**batch, adapter_ids=ids).logits
        for row, adapter in enumerate(ids.tolist()):
            many.set_active([] if adapter < 0 else [many.adapter_names[adapter]])
            alone = many(**{k: v[row : row + 1] for k, v in batch.items()}).logits
            torch.testing.assert_close(routed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    many.set_active(["a", "b", "c"])
    assert many.adapter_names == ("a", "b", "c")


def test_bad_adapter_ids_and_names_are_clear_errors(many):
    with pytest.raises(SurgeryError, match=r"ids are -1 \(no adapter\) or 0..2"):
        many(**inputs(), adapter_ids=torch.tensor([0, 3]))
    with pytest.raises(SurgeryError, match="1-D integer tensor"):
        many(**inputs(), adapter_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(SurgeryError, match="3 ids for a batch of 2 rows"):
        many(**inputs(), adapter_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(SurgeryError, match="no adapter named 'd'"):
        many.set_active("d")


def test_folding_chosen_adapters_with_chosen_weights(many):
    weights = {"a": 1.0, "b": 0.5, "c": 0.0}
    folded = many.fold(adapters=weights)  # verifies itself against the graph with those gates
    many.set_gates(weights)
    try:
        expected = _logits(many)
    finally:
        many.set_active(["a", "b", "c"])
    with torch.no_grad():
        torch.testing.assert_close(folded(**inputs(batch=4), use_cache=False).logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, _logits(many))


def test_replacing_an_adapter_keeps_the_other_adapters_gates(many):
    many.set_active("b")
    many.add_adapter("a", surgeon.parse('match "*.self_attn.v_proj" apply lora(r=2)'))
    assert many.active_adapters == ("a", "b")  # the new "a" starts active; "c" stays off, "b" on
    many.set_active(["a", "b", "c"])


def test_routing_refuses_sites_that_flatten_the_batch():
    gpt2 = surgeon.compile("demo:gpt2", 'adapter "a" { match "*.c_attn" apply lora(r=2) }').eval()
    with pytest.raises(SurgeryError, match="cannot route it"):
        gpt2(**inputs(batch=3), adapter_ids=torch.tensor([0, -1, 0]))


def test_gated_methods_on_a_bfloat16_model():
    """IA3 on outputs and VeRA are interpolated by the gate; in bf16 the gate is cast before use."""
    model = build_demo("llama").to(torch.bfloat16)
    compiled = surgeon.compile(model, 'match "*.self_attn.k_proj" apply ia3()\nmatch "*.self_attn.q_proj" apply vera(r=4)').eval()
    with torch.no_grad():
        out = compiled(**inputs()).logits
        with compiled.disabled():
            base = compiled(**inputs()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(base, build_demo("llama").to(torch.bfloat16).eval()(**inputs()).logits, rtol=0, atol=0)


def test_eager_hooks_follow_the_gates(many):
    eager = build_demo("llama").eval()
    many.set_active("a")
    try:
        handles = many.attach(eager)
        with torch.no_grad():
            torch.testing.assert_close(eager(**inputs()).logits, _logits(many)[:2], rtol=1e-5, atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()
        many.set_active(["a", "b", "c"])


def test_lowered_graphs_equal_the_plain_graphs_in_training_routed_and_gated(many):
    """passes/lower.py on a graph with gates and with adapter_ids: the routed op (and its backward) and the gated
    DoRA op give the plain graph's logits and adapter gradients (CPU: the ops' torch paths)."""
    from surgeon.kernels import dora, routed_lora

    assert dora.dora_linear and routed_lora.routed_lora_linear  # imported: the ops named below are registered

    ids = torch.tensor([0, 1, -1, 2])
    batch = inputs(batch=4)
    params = [p for _, _, module in many.sites() for p in module.parameters()]
    many.train()
    try:
        for extra in ({"adapter_ids": ids}, {}):
            kwargs = many.with_defaults({**batch, **extra})
            graphs = [many.graph(training=True, lowered=flag, **batch, **extra) for flag in (True, False)]
            fused = {n.target for n in graphs[0].graph.nodes} & {torch.ops.surgeon.routed_lora_linear.default, torch.ops.surgeon.dora_linear.default}
            assert fused == ({torch.ops.surgeon.routed_lora_linear.default} if extra else {torch.ops.surgeon.dora_linear.default})
            many.set_active(["a", "b", "c"], weights=[1.0, 0.7, 0.4])
            results = []
            for graph in graphs:
                logits = graph(**kwargs).logits
                results.append((logits, torch.autograd.grad(logits.square().sum(), params, allow_unused=True)))
            (ours, our_grads), (theirs, their_grads) = results
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            for mine, reference in zip(our_grads, their_grads):
                assert (mine is None) == (reference is None)
                if reference is not None:
                    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    finally:
        many.eval()
        many.set_active(["a", "b", "c"])
