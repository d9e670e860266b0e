"""LoRA on nn.MultiheadAttention, against eager PyTorch (the MHA run on W + s B A) and PEFT's lora.MultiheadAttention.

PEFT 0.21 counts out_proj's update twice (its merge adds it, then out_proj's own merge adds it again:
huggingface/peft PR #3774). The comparisons with PEFT measure that factor first and hold either way:
surgeon always equals the eager reference of W + s B A; PEFT equals it with its factor on out_proj.
"""

import copy
import functools

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import surgeon
from surgeon.grammar import PlanError, SurgeryError

E, HEADS, R, ALPHA = 8, 2, 4, 8
RULES = f'match "attn" apply lora(r={R}, alpha={ALPHA})\n'
FACTORS = ("lora_A", "lora_B", "out_proj_lora_A", "out_proj_lora_B")
PEFT_NAMES = {"lora_A": "lora_A", "lora_B": "lora_B", "out_proj_lora_A": "base_layer.out_proj.lora_A",
              "out_proj_lora_B": "base_layer.out_proj.lora_B"}


class Tiny(nn.Module):
    """A linear, a self-attention MultiheadAttention and a head, batch first or not."""

    def __init__(self, batch_first: bool = True, **mha):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(4, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **mha)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        h = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        a, _ = self.attn(h, h, h, need_weights=False)
        out = self.head(h + a)
        return out if self.batch_first else out.transpose(0, 1)


def tiny(**kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tiny(**kwargs).eval()


X = torch.linspace(-1, 1, 2 * 5 * 4).reshape(2, 5, 4)


def compiled_with_weights(model=None, rules=RULES, seed=1):
    model = model or tiny()
    compiled = surgeon.compile(copy.deepcopy(model), rules, example_inputs=(X,))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, adapter in compiled.sites():
            for name in FACTORS:
                getattr(adapter, name).copy_(torch.randn(getattr(adapter, name).shape, generator=generator) * 0.3)
    return model, compiled


def merged_forward(model, factors: dict, scale: float, x, out_factor: float = 1.0):
    """Eager PyTorch: the model with W_in + s B A and W_out + out_factor s B' A' (differentiable in the factors)."""
    attn = model.attn
    weights = {"attn.in_proj_weight": attn.in_proj_weight + scale * factors["lora_B"] @ factors["lora_A"],
               "attn.out_proj.weight": attn.out_proj.weight + out_factor * scale * factors["out_proj_lora_B"] @ factors["out_proj_lora_A"]}
    return torch.func.functional_call(model, weights, (x,))


def factors_of(compiled) -> dict:
    adapter = compiled.adapter_module("default", "attn")
    return {name: getattr(adapter, name) for name in FACTORS}


def peft_twin(model, factors: dict):
    twin = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["attn"], r=R, lora_alpha=ALPHA))
    with torch.no_grad():
        for name, tensor in peft_factors(twin).items():
            tensor.copy_(factors[name])
    return twin.eval()


def peft_factors(peft_model) -> dict:
    modules = dict(peft_model.named_modules())
    return {name: modules[f"base_model.model.attn.{peft}"]["default"].weight for name, peft in PEFT_NAMES.items()}


@functools.lru_cache(maxsize=1)
def peft_out_proj_factor() -> int:
    """How often PEFT's MultiheadAttention counts out_proj's update (2 in PEFT 0.21, 1 once fixed), measured."""
    model = get_peft_model(tiny(), LoraConfig(target_modules=["attn"], r=R, lora_alpha=ALPHA, init_lora_weights=False))
    layer = model.base_model.model.attn.base_layer.out_proj
    weight, delta = layer.base_layer.weight.detach().clone(), layer.get_delta_weight("default").detach()
    merged = model.merge_and_unload().attn.out_proj.weight.detach()
    return next(f for f in (1, 2) if torch.allclose(merged, weight + f * delta, atol=1e-6))


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_mha_is_one_site_reading_both_projections():
    captured = surgeon.capture_model(tiny(), example_inputs=(X,))
    site = captured.sites["attn"]
    assert (site.weight, site.weight_shape, site.in_features, site.out_features) == ("attn.in_proj_weight", (3 * E, E), E, 3 * E)
    assert site.parts == (("attn.in_proj_weight", (3 * E, E)), ("attn.out_proj.weight", (E, E))) and len(site.nodes) == 2
    assert "attn.out_proj" not in captured.sites  # its weight is read in the MHA's frame, as PEFT sees it too
    with pytest.raises(PlanError) as caught:  # targeting out_proj alone: PEFT wraps it and its forward never runs
        surgeon.plan(captured, 'match "attn.out_proj" apply lora(r=2)\n')
    assert [d.code for d in caught.value.diagnostics] == ["nothing-adaptable"]


def test_mha_without_a_packed_self_attention_projection_is_no_site():
    # separate q/k/v weights (kdim != embed_dim; PEFT refuses it too) and cross-attention (the packed weight sliced)
    class Cross(nn.Module):
        def __init__(self, **mha):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True, **mha)

        def forward(self, q, kv):
            return self.attn(q, kv, kv, need_weights=False)[0]

    for mha, kv in (({"kdim": 6, "vdim": 6}, torch.ones(2, 3, 6)), ({}, torch.ones(2, 3, E))):
        captured = surgeon.capture_model(Cross(**mha).eval(), example_inputs=(torch.ones(2, 5, E), kv))
        assert "attn" not in captured.sites, mha
        with pytest.raises(PlanError, match="nothing-adaptable|cannot adapt any module"):
            surgeon.plan(captured, RULES)


@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_and_gradients_equal_eager_merged_weights(batch_first):
    model, compiled = compiled_with_weights(tiny(batch_first=batch_first))
    factors, scale = factors_of(compiled), compiled.adapter_module("default", "attn").scale
    close(compiled(X), merged_forward(model, factors, scale, X))
    assert not torch.allclose(compiled(X), model(X), atol=1e-3)  # the adapter acts
    compiled.train()
    got = torch.autograd.grad(compiled(X).square().sum(), list(factors.values()))
    expected = torch.autograd.grad(merged_forward(model, factors, scale, X).square().sum(), list(factors.values()))
    for name, g, e in zip(FACTORS, got, expected):
        close(g, e)
        assert g.abs().sum() > 0, name


def test_outputs_and_gradients_equal_peft():
    model, compiled = compiled_with_weights()
    with torch.no_grad():  # out_proj's B at zero: PEFT's double count cancels, so outputs and all gradients compare
        compiled.adapter_module("default", "attn").out_proj_lora_B.zero_()
    factors = factors_of(compiled)
    twin = peft_twin(model, factors)
    close(compiled(X), twin(X))
    compiled.train(), twin.train()
    got = torch.autograd.grad(compiled(X).square().sum(), list(factors.values()))
    expected = torch.autograd.grad(twin(X).square().sum(), list(peft_factors(twin).values()))
    for g, e in zip(got, expected):
        close(g, e)
    # with every factor non-zero, PEFT's output is the eager one with its out_proj factor
    model, compiled = compiled_with_weights()
    factors, scale = factors_of(compiled), compiled.adapter_module("default", "attn").scale
    close(peft_twin(model, factors)(X), merged_forward(model, factors, scale, X, peft_out_proj_factor()))


def test_the_adapter_saved_by_surgeon_loads_in_peft(tmp_path):
    model, compiled = compiled_with_weights()
    compiled.save_adapter(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    factors = factors_of(compiled)
    for name, tensor in peft_factors(loaded).items():
        assert torch.equal(tensor, factors[name]), name
    scale = compiled.adapter_module("default", "attn").scale
    close(loaded(X), merged_forward(model, factors, scale, X, peft_out_proj_factor()))
    if peft_out_proj_factor() == 1:
        close(loaded(X), compiled(X))


def test_an_adapter_saved_by_peft_loads_into_surgeon(tmp_path):
    model = tiny()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["attn"], r=R, lora_alpha=ALPHA,
                                                                init_lora_weights=False))  # B random: the update acts
    peft_model.save_pretrained(tmp_path)
    compiled = surgeon.compile(copy.deepcopy(model), adapter=tmp_path, example_inputs=(X,))
    factors = factors_of(compiled)
    for name, tensor in peft_factors(peft_model).items():
        assert torch.equal(factors[name], tensor), name
    scale = compiled.adapter_module("default", "attn").scale
    assert scale == peft_model.base_model.model.attn.scaling["default"]
    close(compiled(X), merged_forward(model, factors, scale, X))
    close(peft_model.eval()(X), merged_forward(model, factors, scale, X, peft_out_proj_factor()))


def test_fold_keeps_the_outputs_and_merges_both_projections():
    model, compiled = compiled_with_weights()
    folded = compiled.fold()
    close(folded(X), compiled(X))
    graph = folded.graph()
    factors, scale = factors_of(compiled), compiled.adapter_module("default", "attn").scale
    with torch.no_grad():
        close(graph.attn.in_proj_weight, model.attn.in_proj_weight + scale * factors["lora_B"] @ factors["lora_A"])
        close(graph.attn.out_proj.weight, model.attn.out_proj.weight + scale * factors["out_proj_lora_B"] @ factors["out_proj_lora_A"])
    assert torch.equal(compiled.base_model.attn.in_proj_weight, model.attn.in_proj_weight)  # the base stays


def test_an_encoder_of_mha_layers_matches_peft_by_module_name():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        model = nn.Sequential(nn.Linear(4, E), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    compiled = surgeon.compile(copy.deepcopy(model), f'match "*.self_attn" apply lora(r={R}, alpha={ALPHA})\n', example_inputs=(X,))
    assert [path for _, path, _ in compiled.sites()] == ["1.layers.0.self_attn", "1.layers.1.self_attn"]
    twin = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["self_attn"], r=R, lora_alpha=ALPHA))
    modules = dict(twin.named_modules())
    with torch.no_grad():  # out_proj's B stays zero (as initialised), where PEFT's double count cancels
        for _, path, adapter in compiled.sites():
            for name in ("lora_A", "lora_B", "out_proj_lora_A"):
                value = torch.randn(getattr(adapter, name).shape) * 0.3
                getattr(adapter, name).copy_(value)
                modules[f"base_model.model.{path}.{PEFT_NAMES[name]}"]["default"].weight.copy_(value)
    assert not torch.allclose(compiled(X), model(X), atol=1e-3)
    # In training mode (no dropout here): in evaluation torch's fused encoder-layer fast path reads the MHA's
    # weights itself, so PEFT's merge never runs and its LoRA is silently left out; surgeon's graph has no fast path.
    close(compiled.train()(X), twin.train()(X))


@pytest.mark.parametrize("rules, code", [
    ('match "attn" apply ia3()\n', "mha-method"),
    ('match "embed"          apply lora(r=2)\nmatch "attn" apply lora(r=2, bias=true)\n', "mha-bias"),
    ('match "attn" apply lora(r=2, init="pissa")\n', None),  # planning refuses it first (its own code)
])
def test_what_peft_cannot_do_on_mha_is_refused_at_its_rule(rules, code):
    with pytest.raises(PlanError) as caught:
        surgeon.compile(tiny(), surgeon.parse(rules, "mha.surgery"), example_inputs=(X,))
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.file, diagnostic.span.line) == ("mha.surgery", rules.count("\n")) and diagnostic.hint
    if code is not None:
        assert diagnostic.code == code and "attn (MultiheadAttention)" in diagnostic.message


def test_mha_problems_name_each_refusal():
    from surgeon.methods.lora import LoraConfig as SurgeonLora
    from surgeon.methods.lora.mha import mha_problems

    class Site:  # what mha_problems reads of a plan site
        path, method = "attn", "lora"
        config = SurgeonLora(r=2, init="olora", bias=True)

    assert [p.code for p in mha_problems(Site())] == ["mha-init", "mha-bias"]
    Site.config = SurgeonLora(r=2, init="gaussian", dropout=0.1)
    assert mha_problems(Site()) == []


def test_dropout_is_not_applied_on_mha_as_in_peft():
    with pytest.warns(UserWarning, match="is not applied"):
        model, compiled = compiled_with_weights(rules='match "attn" apply lora(r=4, alpha=8, dropout=0.5)\n')
    compiled.train()
    factors, scale = factors_of(compiled), compiled.adapter_module("default", "attn").scale
    close(compiled(X), merged_forward(model.train(), factors, scale, X))


def test_eager_hooks_and_routing_refuse_mha_clearly():
    _, compiled = compiled_with_weights()
    with pytest.raises(SurgeryError, match="attach\\(\\) cannot hook LoRA into attn"):
        compiled.attach()
    with pytest.raises(SurgeryError, match="not the batch's"):  # inside the MHA, rows are (sequence, batch)
        compiled(X, adapter_ids=torch.tensor([0, -1]))


def test_the_capture_cache_keeps_an_mha_site(tmp_path, monkeypatch):
    from surgeon.capture.cache import load_capture, store_capture

    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SURGEON_CAPTURE_CACHE", raising=False)
    captured = surgeon.capture_model(tiny(), example_inputs=(X,))  # a plain module is never cached by capture itself
    store_capture("mha-key", captured)
    sites, roles = load_capture("mha-key", captured.opened.module)
    assert sites == captured.sites and sites["attn"].parts == captured.sites["attn"].parts
    assert roles["attn"] == captured.modules["attn"].role
