"""The capture cache (surgeon/capture/cache.py): a second process plans from the file the first one wrote."""

import json

import pytest
import torch

import surgeon
from surgeon.capture.captured import capture
from surgeon.capture.cache import capture_key
from surgeon.capture.models import open_model

from ..methods._checks import randomize_all

RULES = 'match role(attn.q, mlp.down) apply lora(r=2)\nmatch "*.self_attn.v_proj" apply lora(r=4)\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SURGEON_CAPTURE_CACHE", raising=False)
    return tmp_path / "captures"


def test_a_second_capture_reads_the_sites_and_roles_the_first_exported(cache):
    exported = capture(open_model("demo:llama", weights=False))
    assert not exported.cached and exported.program is not None
    assert [f.suffix for f in cache.iterdir()] == [".json"]
    again = capture(open_model("demo:llama", weights=False))
    assert again.cached and again._program is None  # nothing exported ...
    assert again.sites == exported.sites  # Site dataclasses, field by field
    assert {p: m.role for p, m in again.modules.items()} == {p: m.role for p, m in exported.modules.items()}
    assert again.modules == exported.modules and again.ties == exported.ties and again.total_params == exported.total_params
    assert again.program is not None and again.program.graph is not None  # ... until the program is asked for


def test_a_patched_forward_or_a_retied_weight_is_another_key(cache):
    import types

    opened = open_model("demo:gpt2", weights=False)
    key = capture_key(opened)
    block = opened.module.transformer.h[0]
    block.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), block)
    assert capture_key(opened) != key
    del block.forward
    assert capture_key(opened) == key
    opened.module.lm_head.weight = torch.nn.Parameter(opened.module.lm_head.weight.detach().clone())  # untied
    assert capture_key(opened) != key


def test_a_model_compiled_from_the_cache_computes_what_one_compiled_without_it_does(cache, monkeypatch):
    surgeon.plan("demo:llama", RULES)  # fake weights: writes the cache
    from_cache = surgeon.compile("demo:llama", RULES)
    monkeypatch.setenv("SURGEON_CAPTURE_CACHE", "0")
    exported = surgeon.compile("demo:llama", RULES)
    assert from_cache.captured.cached and not exported.captured.cached
    plans = [c.plan.to_json() for c in (from_cache, exported)]
    for plan in plans:
        del plan["model"]["capture_seconds"]
    assert plans[0] == plans[1]
    randomize_all(from_cache, seed=1, std=0.1)
    randomize_all(exported, seed=1, std=0.1)
    batch = dict(from_cache.example_kwargs, labels=from_cache.example_kwargs["input_ids"])
    losses = []
    for compiled in (from_cache, exported):
        compiled.train()
        loss = compiled(**batch).loss  # the cached one exports its graph here, at the first call
        loss.backward()
        losses.append((loss.detach(), [p.grad for _, p in compiled.trainable_parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=0, atol=0)
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_another_config_is_another_key_and_a_plain_module_has_none(cache):
    import transformers

    from surgeon.capture.demos import demo_config

    llama = open_model("demo:llama", weights=False)
    config, _ = demo_config("llama")
    config.num_hidden_layers = 3
    deeper = open_model(transformers.LlamaForCausalLM(config).eval())
    assert capture_key(llama) != capture_key(deeper) is not None
    plain = open_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), example_inputs=(torch.randn(2, 4),))
    assert capture_key(plain) is None
    capture(plain)
    assert not cache.exists()


def test_an_unreadable_or_foreign_file_is_a_miss_and_is_written_again(cache):
    opened = open_model("demo:llama", weights=False)
    key = capture_key(opened)
    cache.mkdir(parents=True)
    for text in ("{not json", json.dumps({"format": 1, "key": "another", "sites": [], "roles": {}})):
        (cache / f"{key}.json").write_text(text)
        captured = capture(opened)
        assert not captured.cached and captured._program is not None
        assert json.loads((cache / f"{key}.json").read_text())["key"] == key


def test_the_cache_can_be_turned_off(cache, monkeypatch):
    monkeypatch.setenv("SURGEON_CAPTURE_CACHE", "0")
    capture(open_model("demo:llama", weights=False))
    assert not cache.exists()
