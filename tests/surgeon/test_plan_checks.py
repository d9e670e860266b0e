"""What compile would refuse about a site, refused by the plan at the rule that chose the site.

Each of these rules planned without complaint before, and failed only when the model was built or
first called; now ``plan()`` (and ``surgeon plan``) reports them with the rule's location.
"""

import json

import pytest
import torch

import surgeon
from surgeon.cli import main
from surgeon.grammar import PlanError, parse
from surgeon.planning.plan import build_plan


def _refused(captured, text: str):
    """The one diagnostic planning ``text`` (as r.surgery) on ``captured`` raises."""
    with pytest.raises(PlanError) as caught:
        build_plan(parse(text, "r.surgery"), captured)
    (diagnostic,) = caught.value.diagnostics
    return diagnostic


def test_two_adapters_replacing_one_embedding_weight(captures):
    text = ('adapter "a" { match "model.embed_tokens" apply trainable_tokens(indices=[1]) }\n'
            'adapter "b" {\n  match "model.embed_tokens" apply trainable_tokens(indices=[2])\n}\n')
    found = _refused(captures("llama"), text)
    assert (found.code, found.span.line, found.span.column) == ("weight-replaced-twice", 3, 3)
    assert found.message == ("trainable_tokens of adapter 'b' on model.embed_tokens would replace a weight that "
                             "trainable_tokens of adapter 'a' already replaces (model.embed_tokens, line 1)")
    assert "list all the token ids in one trainable_tokens rule" in found.hint


def test_a_token_id_beyond_the_vocabulary(captures):
    found = _refused(captures("llama"), 'match "model.embed_tokens" apply trainable_tokens(indices=[3, 1000])')
    assert (found.code, found.span.line, found.span.column) == ("token-range", 1, 1)
    assert found.message == "trainable_tokens on model.embed_tokens: token id 1000 is outside the embedding's 1000 rows"


def test_pissa_and_olora_on_sites_they_do_not_start_from(captures):
    found = _refused(captures("gpt2"), 'match "*.c_attn" apply lora(r=4, init="olora")')
    assert found.code == "init-site"
    assert found.message == ('lora(init="olora") on transformer.h.0.attn.c_attn needs a Linear site, not hf_conv1d '
                             "(and 3 more modules this rule won)")  # one diagnostic for the rule's 4 sites
    assert found.hint == 'on hf_conv1d sites use init="pissa" or "kaiming", or narrow the rule to linear layers'
    found = _refused(captures("llama"), 'match "*.q_proj" apply lora(r=4)\nmatch "model.embed_tokens" apply lora(r=4, init="pissa_niter_2")')
    assert (found.code, found.span.line) == ("init-site", 2)
    assert "needs a Linear or Conv1D site, not embedding" in found.message


def test_pissa_needs_weight_values_which_a_meta_model_lacks_and_a_fake_one_stands_for():
    rules = 'match "0" apply lora(r=2, init="pissa")'
    with torch.device("meta"):
        empty = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(PlanError) as caught:
        surgeon.plan(empty, rules, example_inputs=(torch.randn(2, 8, device="meta"),))
    (found,) = caught.value.diagnostics
    assert found.code == "init-weight" and "(its weights are on the meta device)" in found.message
    # `surgeon plan` builds models from their config with fake tensors: compile loads the values, so no error
    assert [s.params["init"] for s in surgeon.plan("demo:gpt2", 'match "*.h.0.attn.c_attn" apply lora(r=2, init="pissa")').sites] == ["pissa"]


def test_a_grouped_convolution_needs_a_rank_its_groups_divide():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, groups=2))
    captured = surgeon.capture_model(model, example_inputs=(torch.randn(1, 4, 8, 8),))
    found = _refused(captured, 'match "0" apply lora(r=3)')
    assert (found.code, found.message) == ("rank-groups", "lora on 0: a convolution with 2 groups needs a rank divisible by 2, not 3")
    assert found.hint == "B is a 1x1 convolution grouped as the base (PEFT's layout): use r=4"
    assert build_plan(parse('match "0" apply lora(r=4)'), captured).sites[0].trainable_params == 4 * 4 * 9 + 6 * 2


def test_vera_sites_of_one_adapter_with_different_arguments(captures):
    text = 'match "*.q_proj" apply vera(r=4)\nadapter "other" { match "*.k_proj" apply vera(r=2) }\nmatch "*.v_proj" apply vera(r=8)'
    found = _refused(captures("llama"), text)  # "other" has its own A and B: only line 3 disagrees
    assert (found.code, found.span.line) == ("vera-arguments", 3)
    assert found.message == ("adapter 'default' gives its VeRA sites different arguments, but they share one A and B: "
                             "model.layers.0.self_attn.q_proj (line 1) has r=4, model.layers.0.self_attn.v_proj has r=8 "
                             "(and 3 more modules this rule won)")


def test_loftq_needs_the_unquantized_weights():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32)).to("cpu")  # quantizes it
    captured = surgeon.capture_model(model, example_inputs=(torch.randn(2, 16),))
    rules = 'match "0" apply lora(r=2, init="loftq")'
    found = _refused(captured, rules)
    assert (found.code, found.span.line) == ("loftq-full-precision", 1)
    assert found.message == 'lora(init="loftq") on 0 needs the unquantized weights of Sequential, and none were given'
    assert "surgeon.compile(model, rules, full_precision=" in found.hint
    captured.opened.full_precision = {"0.weight": torch.zeros(16, 16)}.__getitem__  # what compile(full_precision=) sets
    assert [s.params["init"] for s in build_plan(parse(rules), captured).sites] == ["loftq"]


def test_the_plan_says_which_sites_adapter_ids_cannot_route(captures):
    plan = build_plan(parse('match "*.h.0.attn.c_attn", "transformer.wte" apply lora(r=2)'), captures("gpt2"))
    assert {s.path: s.unroutable for s in plan.sites} == {
        "transformer.wte": None, "transformer.h.0.attn.c_attn": "GPT-2's Conv1D computes on batch and sequence flattened into rows"}
    tokens = build_plan(parse('match "model.embed_tokens" apply trainable_tokens(indices=[1])'), captures("llama"))
    assert tokens.to_json()["unroutable_sites"] == [
        {"adapter": "default", "path": "model.embed_tokens", "reason": "its rows replace the embedding's for the whole batch"}]


def test_surgeon_plan_exits_1_at_the_rule_for_what_only_compile_refused(tmp_path, capsys):
    rules = tmp_path / "r.surgery"
    rules.write_text('match "*.q_proj" apply lora(r=4)\nmatch "model.embed_tokens" apply trainable_tokens(indices=[4096])\n')
    assert main(["plan", "demo:llama", str(rules)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{rules}:2:1: error: trainable_tokens on model.embed_tokens: token id 4096 is outside the embedding's 1000 rows\n"
                          '  match "model.embed_tokens" apply trainable_tokens(indices=[4096])\n  ^^^^')
    assert "Traceback" not in err


def test_a_rules_outcome_counts_only_the_modules_its_method_can_adapt(captures):
    from surgeon._render import plan_tables

    plan = build_plan(parse('match "model.layers.1.*" apply lora(r=2)\nmatch "lm_head" train'), captures("llama"))
    captions = [r.caption.plain for r in plan_tables(plan) if getattr(r, "caption", None) is not None]
    assert captions == [
        "won 7 of 7 matched modules the method can adapt; 5 matched modules it cannot adapt (not supported: "
        "LlamaAttention x1, LlamaMLP x1, SiLUActivation x1, LlamaRMSNorm x2)",  # norms, containers, an activation: no site
        "won 1 of 1 matched module",
    ]
    assert len(plan.rules[0].adaptable) == 7 and plan.to_json()["rules"][0]["adaptable"] == list(plan.rules[0].adaptable)


def test_inspect_says_how_conv1d_stores_its_weight(capsys):
    assert main(["inspect", "demo:gpt2", "--match", "{transformer.h.0.attn.c_attn,lm_head}", "--format", "json"]) == 0
    modules = {m["path"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    assert (modules["transformer.h.0.attn.c_attn"]["weight_shape"], modules["transformer.h.0.attn.c_attn"]["weight_layout"]) == ([64, 192], "in, out")
    assert (modules["lm_head"]["weight_shape"], modules["lm_head"]["weight_layout"]) == ([1000, 64], "out, in")
    assert main(["inspect", "demo:gpt2", "--match", "{transformer.h.0.attn.c_attn,lm_head}"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert "64 -> 192" in rows["transformer.h.0.attn.c_attn"] and "64x192 (in, out)" in rows["transformer.h.0.attn.c_attn"]
    assert "64 -> 1000" in rows["lm_head"] and "1000x64 " in rows["lm_head"] and "(in, out)" not in rows["lm_head"]
