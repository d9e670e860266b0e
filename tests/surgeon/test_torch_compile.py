"""torch.compile(fullgraph=True) of compiled graphs: no graph breaks, and no recompiles when the routing,
the active set or the adapter weights change (torch's compile counters)."""

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import surgeon

from ._peft_reference import inputs
from .methods._checks import randomize_all

RULES = """\
adapter "a" {
  match "*.self_attn.{q,v}_proj" apply lora(r=4, alpha=8)
}
adapter "b" {
  match "*.self_attn.{q,k}_proj" apply lora(r=8)
  match "*.mlp.down_proj" apply ia3(feedforward=true)
}
"""


def _compiled():
    compiled = surgeon.compile("demo:llama", RULES).eval()
    randomize_all(compiled, seed=2, std=0.1)
    return compiled


def test_routing_patterns_never_recompile_and_give_the_eager_graphs_outputs():
    torch._dynamo.reset()
    compiled = _compiled()
    graph = compiled.graph(**inputs(batch=4), adapter_ids=torch.tensor([0, 1, -1, 0]))
    counter = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(graph, backend=counter, fullgraph=True)  # fullgraph: a break is an error
    with torch.no_grad():
        for ids in ([0, 1, -1, 0], [1, 1, 1, 1], [-1, -1, 0, 1]):
            batch = dict(inputs(batch=4), use_cache=False, adapter_ids=torch.tensor(ids))
            torch.testing.assert_close(fast(**batch).logits, graph(**batch).logits, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


def test_switching_and_new_weights_never_recompile():
    torch._dynamo.reset()
    compiled = _compiled()
    graph = compiled.graph(**inputs())
    counter = CompileCounterWithBackend("aot_eager")
    fast = torch.compile(graph, backend=counter, fullgraph=True)
    batch = dict(inputs(), use_cache=False)
    with torch.no_grad():
        for active in (["a"], ["a", "b"], [], ["b"]):
            compiled.set_active(active)
            torch.testing.assert_close(fast(**batch).logits, graph(**batch).logits, rtol=1e-6, atol=1e-6)
        with compiled.disabled():
            fast(**batch)
        randomize_all(compiled, seed=9, std=0.1)  # new adapter weights, in place
        torch.testing.assert_close(fast(**batch).logits, graph(**batch).logits, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


def test_inductor_compiles_a_routed_graph_once():
    """The real backend on this CPU, on a small model (inductor takes about a minute on the tiny Llama)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    rules = 'adapter "a" { match "0" apply lora(r=2) }\nadapter "b" { match "0", "2" apply lora(r=4) }'
    compiled = surgeon.compile(model, rules, example_inputs=(x,)).eval()
    randomize_all(compiled, seed=1)
    graph = compiled.graph(x, adapter_ids=torch.tensor([0, 1, -1, 1]))
    counter = CompileCounterWithBackend("inductor")
    fast = torch.compile(graph, backend=counter, fullgraph=True)
    with torch.no_grad():
        for ids in ([0, 1, -1, 1], [1, 0, 0, -1], [-1, -1, -1, -1]):
            torch.testing.assert_close(fast(x, adapter_ids=torch.tensor(ids)), graph(x, adapter_ids=torch.tensor(ids)), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_the_compiled_model_itself_compiles_whole_after_its_first_call():
    """torch.compile of the Compiled module (not one graph): Dynamo traces its forward, which picks the graph;
    nothing there may break the graph (the CPU's LoRA lowering is decided before, not asked of Triton)."""
    torch._dynamo.reset()
    compiled = _compiled()
    batch = dict(inputs())
    with torch.no_grad():
        expected = compiled(**batch).logits  # the first call captures the graph, eagerly
        counter = CompileCounterWithBackend("aot_eager")
        fast = torch.compile(compiled, backend=counter, fullgraph=True)
        torch.testing.assert_close(fast(**batch).logits, expected, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    assert any(n.target is torch.ops.surgeon.lora_linear.default for g in compiled._graphs.values() for n in g.graph.nodes)
