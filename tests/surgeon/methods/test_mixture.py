"""One adapter mixing methods (lora, dora, ia3): trains, saves in surgeon's mixture format, reloads, folds."""

import json

import pytest
import torch
from peft import PeftModel

import surgeon
from surgeon.capture.demos import build_demo

from .._peft_reference import inputs
from ._checks import randomize_all

RULES = """\
match "*.self_attn.q_proj" apply lora(r=4, alpha=8)
match "*.self_attn.v_proj" apply dora(r=2, alpha=4)
match "*.mlp.down_proj" apply ia3(feedforward=true)
match "*.mlp.up_proj" apply ia3()
match "model.norm" train
"""


@pytest.fixture(scope="module")
def trained():
    compiled = surgeon.compile("demo:llama", RULES)
    randomize_all(compiled, seed=3, std=0.05)
    optimizer = torch.optim.AdamW([p for _, p in compiled.trainable_parameters()], lr=1e-2)
    compiled.train()
    losses = []
    for _ in range(5):
        loss = compiled(**inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    return compiled.eval()


def test_a_mixture_saves_one_peft_adapter_per_method_and_reloads_equal(trained, tmp_path):
    expected = trained(**inputs()).logits.detach()
    trained.save_adapter(tmp_path / "mixed")
    top = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert top["peft_type"] == "SURGEON_MIXTURE" and top["methods"] == ["lora", "dora", "ia3"]
    # Each part is a complete PEFT adapter of its own method, holding only its sites.
    for method, peft_type in (("lora", "LORA"), ("dora", "LORA"), ("ia3", "IA3")):
        part = tmp_path / "mixed" / top["parts"][method]
        model = PeftModel.from_pretrained(build_demo("llama"), part)
        config = model.peft_config["default"]
        assert config.peft_type.value == peft_type and getattr(config, "use_dora", False) == (method == "dora")
        sites = {s.path for s in trained.plan.sites if s.method == method}
        assert set(config.target_modules) == sites
        assert bool(config.modules_to_save) == (method == "lora")  # train modules go with the first part
    again = surgeon.compile("demo:llama", adapter=tmp_path / "mixed").eval()
    assert [(s.path, s.method) for s in again.plan.sites] == [(s.path, s.method) for s in trained.plan.sites]
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.fold()(**inputs(), use_cache=False).logits, expected, rtol=1e-4, atol=1e-5)


def test_a_mixture_folds_into_a_merged_checkpoint_transformers_loads(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    expected = trained(**inputs()).logits.detach()
    trained.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs()).logits, expected, rtol=1e-4, atol=1e-5)


def test_rules_from_a_mixture_folder_are_the_parts_rules(trained, tmp_path):
    from surgeon.checkpoints.peft import rules_from_folder

    trained.save_adapter(tmp_path / "mixed")
    text = rules_from_folder(tmp_path / "mixed")
    assert "apply lora(r=4, alpha=8)" in text and "apply dora(r=2, alpha=4)" in text and "apply ia3(feedforward=true)" in text
    surgeon.parse(text)  # checked like any rules
