"""Capture: every adaptable site found at its module path, shapes right, dynamic shapes honest."""

import pytest
import torch
import transformers

from surgeon.api import capture_model
from surgeon.grammar import ModelError, SurgeryError
from surgeon.capture.models import open_model

from ..conftest import tiny_cnn


def _paths(model, cls):
    return sorted(name for name, m in model.named_modules() if isinstance(m, cls))


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
def test_every_linear_is_a_site_at_its_path(captures, name):
    captured = captures(name)
    model = captured.opened.module
    linear_sites = sorted(p for p, s in captured.sites.items() if s.kind == "linear")
    assert linear_sites == _paths(model, torch.nn.Linear)
    for path in linear_sites:
        module, site = model.get_submodule(path), captured.sites[path]
        assert site.weight == f"{path}.weight"
        assert site.weight_shape == tuple(module.weight.shape)
        assert (site.in_features, site.out_features) == (module.in_features, module.out_features)
    assert sorted(p for p, s in captured.sites.items() if s.kind == "embedding") == _paths(model, torch.nn.Embedding)


def test_gpt2_conv1d_is_a_transposed_linear_site_and_the_tie_is_visible(captures):
    captured = captures("gpt2")
    model = captured.opened.module
    conv_sites = sorted(p for p, s in captured.sites.items() if s.kind == "hf_conv1d")
    assert conv_sites == _paths(model, transformers.pytorch_utils.Conv1D)
    c_attn = captured.sites["transformer.h.0.attn.c_attn"]
    assert c_attn.weight_shape == (64, 192)  # stored (in, out)
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert captured.ties == (("transformer.wte.weight", "lm_head.weight"),)
    assert captured.sites["lm_head"].tied_with == ("transformer.wte.weight",)
    assert captured.sites["transformer.wte"].weight == "transformer.wte.weight"
    assert captured.sites["transformer.wte"].tied_with == ("lm_head.weight",)


def test_plain_cnn_convolutions_and_head(captures):
    captured = captures("cnn")
    kinds = {p: (s.kind, s.in_features, s.out_features) for p, s in captured.sites.items()}
    assert kinds == {"conv1": ("conv2d", 3, 8), "conv2": ("conv2d", 8, 16), "head": ("linear", 16, 10)}
    assert captured.modules["norm"].type_names[:2] == ("BatchNorm2d", "_BatchNorm")


def test_module_facts_the_language_reads(captures):
    modules = captures("llama").modules
    q = modules["model.layers.3.self_attn.q_proj"]
    assert (q.layer, q.depth, q.in_features, q.out_features, q.params) == (3, 5, 64, 64, 64 * 64)
    assert modules["lm_head"].layer is None
    assert modules["model.layers.2"].params == sum(
        p.numel() for p in captures("llama").opened.module.model.layers[2].parameters()
    )
    assert "Linear" in q.type_names


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_the_captured_graph_has_dynamic_batch_and_sequence(captures, name):
    captured = captures(name)
    from surgeon.capture.export import bind_program

    model = captured.opened.module
    graph = bind_program(captured.program, model)
    for batch, seq in ((1, 5), (3, 17)):
        ids = torch.arange(batch * seq).reshape(batch, seq) % 1000
        kwargs = {k: v for k, v in captured.opened.example_kwargs.items() if not isinstance(v, torch.Tensor)}
        kwargs.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        if "labels" in captured.opened.example_kwargs:
            kwargs["labels"] = ids
        with torch.no_grad():
            expected = model(**kwargs).logits
            got = graph(**kwargs).logits
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_planning_capture_uses_fake_tensors_and_finds_the_same_sites(captures):
    real = captures("llama")
    fake = capture_model("demo:llama", weights=False)
    assert fake.opened.fake
    assert all(type(p).__name__ == "FakeTensor" for p in fake.opened.module.parameters())
    assert fake.sites == real.sites
    assert fake.modules == real.modules
    assert fake.total_params == real.total_params


class Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot follow it
            return x
        return -x


def test_capture_failure_names_the_module_and_why():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(Branchy()))
    with pytest.raises(ModelError) as caught:
        capture_model(model, example_inputs=(torch.randn(2, 4),))
    (d,) = caught.value.diagnostics
    assert d.message.startswith(
        "cannot capture Sequential in module '1.0' (Branchy): GuardOnDataDependentSymNode: "
        "Could not guard on data-dependent expression"
    )
    assert d.hint == (
        "the module branches on tensor values, which torch.export cannot follow; "
        "rewrite the branch with torch.where or torch.cond, or give it inputs that avoid it"
    )


def test_a_plain_module_without_example_inputs_is_a_clear_error():
    with pytest.raises(SurgeryError) as caught:
        capture_model(torch.nn.Linear(2, 2))
    assert str(caught.value) == (
        "error: cannot capture Linear: no example inputs\n"
        "hint: pass example_inputs= (a tuple of arguments or a dict of keyword arguments), "
        "or return (module, example_inputs) from your factory"
    )


def test_global_hooks_are_removed_after_capture():
    from torch.nn.modules import module as module_impl

    before = (len(module_impl._global_forward_pre_hooks), len(module_impl._global_forward_hooks))
    model, inputs = tiny_cnn()
    capture_model(model, example_inputs=inputs)
    with pytest.raises(ModelError):
        capture_model(torch.nn.Sequential(Branchy()), example_inputs=(torch.randn(2, 4),))
    assert (len(module_impl._global_forward_pre_hooks), len(module_impl._global_forward_hooks)) == before


def test_programs_are_cached_per_architecture_and_bound_to_each_models_own_weights():
    from surgeon.capture.export import _PROGRAMS, bind_program, export_program

    first, second = build_hf("llama", seed=1), build_hf("llama", seed=2)
    kwargs = open_model(first).example_kwargs
    program_a = export_program(first, (), kwargs, True, "a")
    program_b = export_program(second, (), kwargs, True, "b")  # the same architecture: a cache hit
    assert any(p is program_b for p in _PROGRAMS.values())
    assert all(t.device.type == "meta" for t in program_b.state_dict.values())  # the cache holds no weights
    for model, program in ((first, program_a), (second, program_b)):
        graph = bind_program(program, model)
        with torch.no_grad():
            torch.testing.assert_close(graph(**kwargs).logits, model(**kwargs).logits, rtol=0, atol=0)
        assert graph.get_submodule("model.layers.0.self_attn.q_proj").weight is model.model.layers[0].self_attn.q_proj.weight


def build_hf(name, seed):
    from surgeon.capture.demos import demo_config

    config, model_class = demo_config(name)
    torch.manual_seed(seed)
    return model_class(config).eval()
