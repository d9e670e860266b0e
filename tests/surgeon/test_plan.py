"""Plans: what the rules do to a model, checked against PEFT's own counts, and every plan error."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from surgeon.capture.demos import build_demo
from surgeon.grammar import PlanError, parse
from surgeon.planning.plan import build_plan

# (demo, rules, the equivalent PEFT LoraConfig)
PEFT_CASES = {
    "llama q,v": (
        "llama",
        'match "*.{q,v}_proj" apply lora(r=8, alpha=16)',
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    ),
    "llama skip, rank-varying regex, train": (
        "llama",
        'match "*.mlp.*_proj" apply lora(r=4)\n'
        'match "*.layers.0.*" skip\n'
        'match re"model\\.layers\\.(1|3)\\.mlp\\.down_proj" apply lora(r=16)\n'
        'match "lm_head" train\n',
        dict(
            r=4,
            target_modules=r".*layers\.[123]\.mlp\.(gate|up|down)_proj",
            rank_pattern={r"model\.layers\.(1|3)\.mlp\.down_proj": 16},
            modules_to_save=["lm_head"],
        ),
    ),
    "gpt2 Conv1D, tied lm_head trained": (
        "gpt2",
        'match "*.c_attn" apply lora(r=8)\nmatch "lm_head" train',
        dict(r=8, target_modules=["c_attn"], modules_to_save=["lm_head"], fan_in_fan_out=True),
    ),
    "bert bias, classifier": (
        "bert",
        'match "*.attention.self.{query,value}" apply lora(r=8, bias=true)\nmatch "classifier" train',
        dict(r=8, target_modules=["query", "value"], modules_to_save=["classifier"], lora_bias=True),
    ),
    "qwen2 all linear by type and predicate": (
        "qwen2",
        'match type(Linear) where not name("lm_head") apply lora(r=2)',
        dict(r=2, target_modules="all-linear"),
    ),
    "qwen2 layers by predicate": (
        "qwen2",
        'match "*.mlp.down_proj" where layer in [0, 2] or layer >= 3 apply lora(r=6)',
        dict(r=6, target_modules=["down_proj"], layers_to_transform=[0, 2, 3]),
    ),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_trainable_parameters_equal_peft(captures, case):
    demo, rules, peft_kwargs = PEFT_CASES[case]
    plan = build_plan(parse(rules), captures(demo))
    peft_model = get_peft_model(build_demo(demo), LoraConfig(**peft_kwargs))
    trainable, everything = peft_model.get_nb_trainable_parameters()
    assert plan.trainable_params == trainable
    # PEFT's total also counts the frozen originals of modules_to_save, which it copies.
    assert plan.total_params == everything - sum(t.trainable_params for t in plan.trained)
    peft_sites = {
        name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and name
    }
    assert {s.path for s in plan.sites} == peft_sites


def test_llama_example_plan(captures):
    from surgeon.grammar import load_rules

    plan = build_plan(load_rules("examples/rules/llama-lora.surgery"), captures("llama"))
    by_line = {r.line: r for r in plan.rules}
    assert (len(by_line[2].matched), len(by_line[2].won)) == (8, 6)  # layer 0 is skipped by line 5
    assert "model.layers.1.mlp.down_proj" in by_line[3].matched
    assert "model.layers.1.mlp.down_proj" not in by_line[3].won  # line 4 comes later: it wins
    assert by_line[4].won == ("model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj")
    assert by_line[6].won == ("lm_head",)
    down = next(s for s in plan.sites if s.path == "model.layers.1.mlp.down_proj")
    assert (down.adapter, down.params["r"], down.params["rslora"], down.trainable_params) == ("default", 16, True, 16 * (1024 + 64))
    math = [s for s in plan.sites if s.adapter == "math"]
    assert [s.path.rsplit(".", 1)[-1] for s in math] == ["gate_proj", "up_proj"] * 4
    assert plan.adapters == ("default", "math")
    assert plan.layers()[0] == {"layer": 0, "sites": 2, "adapters": {"math": 2}, "modules": ["gate_proj", "up_proj"]}


def test_plan_json_schema(captures):
    plan = build_plan(parse('match "*.q_proj" apply lora(r=8)\nmatch "lm_head" train'), captures("llama"))
    data = json.loads(json.dumps(plan.to_json()))
    assert data["schema_version"] == 1
    site = data["sites"][0]
    assert {"path", "adapter", "method", "params", "trainable_params"} <= set(site)
    assert site == {
        "path": "model.layers.0.self_attn.q_proj",
        "adapter": "default",
        "method": "lora",
        "params": {"r": 8, "alpha": None, "dropout": 0.0, "rslora": False, "init": "kaiming", "bias": False, "loftq_iter": 1},
        "quantization": None,
        "module_type": "Linear",
        "kind": "linear",
        "in_features": 64,
        "out_features": 64,
        "weight_shape": [64, 64],
        "trainable_params": 8 * 128,
        "layer": 0,
        "rule_line": 1,
        "tied_with": [],
    }
    totals = data["totals"]
    assert totals["trainable_params"] == 4 * 8 * 128 + 64000
    assert totals["total_params"] == plan.base_params + 4 * 8 * 128
    assert totals["adapter_bytes"] == 4 * 8 * 128 * 4 + 64000 * 4
    assert data["trained_modules"] == [
        {"path": "lm_head", "adapter": "default", "module_type": "Linear", "trainable_params": 64000, "rule_line": 2}
    ]


def _plan_error(captured, text, path="r.surgery"):
    with pytest.raises(PlanError) as caught:
        build_plan(parse(text, path), captured)
    return str(caught.value)


def test_a_rule_that_matches_nothing_names_the_closest_paths_and_the_family(captures):
    assert _plan_error(captures("gpt2"), 'match "*.self_attn.{q,v}_proj" apply lora(r=8)\n') == (
        "r.surgery:1:1: error: this rule matches no module of the model: \"*.self_attn.{q,v}_proj\"; "
        "closest module paths: transformer.h.0.attn.c_proj\n"
        '  match "*.self_attn.{q,v}_proj" apply lora(r=8)\n'
        "  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "hint: this model has no 'q_proj'; it has c_attn (e.g. transformer.h.0.attn.c_attn); "
        "role(attn.qkv) selects them by what they do, on any architecture"
    )
    assert _plan_error(captures("llama"), 'match "*.q_prj" skip\n') == (
        "r.surgery:1:1: error: this rule matches no module of the model: \"*.q_prj\"; "
        "closest module paths: model.layers.0.self_attn.q_proj, model.layers.0.self_attn.v_proj\n"
        '  match "*.q_prj" skip\n'
        "  ^^^^^^^^^^^^^^^^^^^^\n"
        "hint: the adaptable modules of this model end in: down_proj, embed_tokens, gate_proj, k_proj, lm_head, "
        "o_proj, q_proj, up_proj, v_proj"
    )


def test_a_where_clause_that_removes_everything(captures):
    assert _plan_error(captures("llama"), 'match "*.q_proj" where layer >= 8 apply lora(r=8)\n') == (
        "r.surgery:1:1: error: no module matched by \"*.q_proj\" satisfies 'where layer >= 8' (4 modules were tested)\n"
        '  match "*.q_proj" where layer >= 8 apply lora(r=8)\n'
        "  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "hint: among those modules layer runs from 0 to 3"
    )


def test_a_method_that_cannot_adapt_anything_matched(captures):
    assert _plan_error(captures("llama"), 'match "*.input_layernorm" apply lora(r=8)\n') == (
        "r.surgery:1:1: error: lora cannot adapt any module this rule matches (LlamaRMSNorm x4)\n"
        '  match "*.input_layernorm" apply lora(r=8)\n'
        "  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "hint: lora adapts linear, hf_conv1d, embedding, conv1d, conv2d and conv3d sites; try type(Linear) or a glob that ends at a projection"
    )


def test_all_errors_are_reported_at_once(captures):
    text = 'match "*.nope" skip\nmatch "*.q_proj" apply lora(r=2)\nmatch "*.norm" apply lora(r=2)\n'
    with pytest.raises(PlanError) as caught:
        build_plan(parse(text), captures("llama"))
    assert [(d.span.line, d.code) for d in caught.value.diagnostics] == [(1, "no-match"), (3, "nothing-adaptable")]


def test_unadaptable_modules_are_listed_not_fatal(captures):
    plan = build_plan(parse('match "model.layers.1.*" apply lora(r=2)'), captures("llama"))
    (report,) = plan.rules
    assert len(plan.sites) == 7  # the 7 linears of layer 1
    unsupported = dict(report.unsupported)
    assert unsupported["model.layers.1.input_layernorm"] == "LlamaRMSNorm"
    assert unsupported["model.layers.1.self_attn"] == "LlamaAttention"


def test_a_rule_that_never_wins_is_a_warning(captures):
    plan = build_plan(parse('match "*.q_proj" apply lora(r=2)\nmatch "*_proj" apply lora(r=4)', "r.surgery"), captures("llama"))
    (warning,) = plan.warnings
    assert (warning.severity, warning.code, warning.span.line) == ("warning", "never-wins", 1)
    assert warning.message == "this rule never wins: every module it matches is taken by a later rule (line 2)"
    assert all(s.params["r"] == 4 for s in plan.sites)


def test_adapters_decide_independently_and_skip_can_be_overridden(captures):
    text = 'match "*" skip\nmatch "*.q_proj" apply lora(r=8)\nadapter "b" {\n  match "*.q_proj" where layer == 0 apply lora(r=2)\n}\n'
    plan = build_plan(parse(text), captures("llama"))
    assert sorted((s.adapter, s.path) for s in plan.sites) == sorted(
        [("default", f"model.layers.{i}.self_attn.q_proj") for i in range(4)] + [("b", "model.layers.0.self_attn.q_proj")]
    )


class WideLinear(torch.nn.Linear):
    """A subclass: type(Linear) matches it too."""


def test_type_selector_matches_subclasses():
    from surgeon.api import capture_model

    model = torch.nn.Sequential(WideLinear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    captured = capture_model(model, example_inputs=(torch.randn(2, 4),))
    plan = build_plan(parse('match type(Linear) apply lora(r=2)\nmatch type("WideLinear") skip'), captured)
    assert [s.path for s in plan.sites] == ["2"]
