"""The pass manager: order, linting, named failures, user passes at named points."""

import importlib.util
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.methods import lowering_patterns
from surgeon.passes import POINTS, STAGES, PassError, PassResult, Pipeline, adapter_nodes, describe_stages, run_passes
from surgeon.passes.lower import describe_patterns, kernel_modules, patterns_for


def _tiny_graph():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) + 1

    return torch.fx.symbolic_trace(M())


def test_passes_run_in_order_and_report_changes():
    seen = []

    def first(gm):
        seen.append("first")
        return PassResult(gm, False)

    def second(gm):
        seen.append("second")
        return PassResult(gm, True)

    result = run_passes(_tiny_graph(), [first, second])
    assert seen == ["first", "second"] and result.modified


def test_a_failing_pass_is_named_with_the_passes_before_it():
    def fine(gm):
        return PassResult(gm, False)

    def broken(gm):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match=r"pass 'broken' failed \(after fine\): RuntimeError: boom"):
        run_passes(_tiny_graph(), [fine, broken])


def test_a_pass_that_breaks_the_graph_fails_the_lint():
    def dangling(gm):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        node.args = (node,)  # uses itself before it is defined
        return PassResult(gm, True)

    with pytest.raises(PassError, match="pass 'dangling' left an invalid graph"):
        run_passes(_tiny_graph(), [dangling])


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match="returned int, not a PassResult"):
        run_passes(_tiny_graph(), [lambda gm: 3])


def test_unknown_pass_points_are_refused():
    with pytest.raises(PassError, match="unknown pass point: after_everything"):
        Pipeline.with_points({"insert": []}, {"after_everything": [lambda gm: None]})


def test_user_passes_run_at_their_points_in_compile_and_fold():
    calls = []

    def after_insert(gm):
        calls.append(("after_insert", len(adapter_nodes(gm, role="out"))))
        return PassResult(gm, False)

    def before_fold(gm):
        calls.append(("before_fold", len(adapter_nodes(gm, role="out"))))
        return PassResult(gm, False)

    def after_fold(gm):
        calls.append(("after_fold", len(adapter_nodes(gm, role="out"))))
        return PassResult(gm, False)

    compiled = surgeon.compile(
        "demo:llama",
        'match "*.q_proj" apply lora(r=2)',
        passes={"after_insert": [after_insert], "before_fold": before_fold, "after_fold": [after_fold]},
        kernels="torch",  # one graph for the call and the fold (auto on the CPU lowers the call's LoRA sites)
    ).eval()
    compiled(**compiled.example_kwargs)
    compiled.fold()
    assert calls == [("after_insert", 4), ("before_fold", 4), ("after_fold", 0)]


def test_the_example_user_pass_logs_every_site(capsys):
    path = Path(__file__).resolve().parents[2] / "examples" / "passes" / "log_adapted_sites.py"
    spec = importlib.util.spec_from_file_location("log_adapted_sites", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    compiled = surgeon.compile("demo:gpt2", 'match "*.c_attn" apply lora(r=3)', passes={"after_insert": [module.log_adapted_sites]})
    compiled.eval()(**compiled.example_kwargs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["default", "transformer.h.0.attn.c_attn", "A", "(3,", "64)", "B", "(192,", "3)"]
    assert len(lines) == 4


def test_the_stages_are_data_and_the_points_follow_from_them():
    assert [s.name for s in STAGES] == ["insert", "lower", "fold"]
    assert POINTS == ("before_insert", "after_insert", "before_lower", "after_lower", "before_fold", "after_fold")
    text = describe_stages()
    assert [line.split(":")[0].strip() for line in text.splitlines()] == [
        "before_insert", "insert", "after_insert", "before_lower", "lower", "after_lower", "before_fold", "fold", "after_fold"]


def test_stages_run_in_their_order_between_their_points():
    def name(label):
        def pass_(gm):
            return PassResult(gm, False)

        pass_.__name__ = label
        return pass_

    pipeline = Pipeline.with_points({"lower": [name("lower")], "insert": [name("insert")]},
                                    {"after_lower": name("mine"), "before_fold": [name("not here")]})
    assert str(pipeline) == "insert: insert\nlower: lower\nafter_lower: mine"
    with pytest.raises(PassError, match="unknown pipeline stage: verify"):
        Pipeline.with_points({"verify": []}, None)


def test_lowering_is_a_table_each_method_contributes_to():
    gated, fallback, routed = patterns_for(), patterns_for(fallback=True), patterns_for(routed=True)
    assert set(gated) | set(routed) == set(lowering_patterns()) and not set(gated) & set(routed)
    assert set(fallback) == {p for p in gated if p.fallback_pays} and fallback
    assert {p.method for p in lowering_patterns()} == {"lora", "dora"}  # what the built-in methods offer
    assert len(describe_patterns().splitlines()) == len(lowering_patterns())
    for module in kernel_modules():  # what a saved program needs imported
        assert importlib.util.find_spec(module) is not None


def test_user_passes_run_before_and_after_lowering():
    calls = []

    def before_lower(gm):
        calls.append(("before_lower", len(adapter_nodes(gm, role="fused"))))

    def after_lower(gm):
        calls.append(("after_lower", len(adapter_nodes(gm, role="fused"))))

    compiled = surgeon.compile("demo:llama", 'match "*.q_proj" apply lora(r=2)', kernels="auto",
                               passes={"before_lower": before_lower, "after_lower": [after_lower]}).eval()
    compiled(**compiled.example_kwargs)
    if compiled.lowers():
        assert calls == [("before_lower", 0), ("after_lower", 4)]
