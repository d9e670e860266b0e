"""Hot-swap: another LoRA adapter's weights into a compiled graph or a saved program, with no new graph."""

import pytest
import torch

import surgeon
from surgeon.grammar import SurgeryError
from surgeon.checkpoints.hot_swap import swap_program_adapter

from ._peft_reference import inputs
from .methods._checks import randomize_all


def _saved(tmp_path, name, rules, seed):
    source = surgeon.compile("demo:llama", rules)
    randomize_all(source, seed=seed, std=0.2)
    source.save_adapter(tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def served():
    return surgeon.compile("demo:llama", 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)').eval()


def _logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


def test_a_swap_equals_a_fresh_compile_and_never_recompiles(served, tmp_path):
    from torch._dynamo.testing import CompileCounter

    small = _saved(tmp_path, "small", 'match "*.self_attn.q_proj" apply lora(r=4, alpha=4)', seed=1)
    other = _saved(tmp_path, "other", 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=8, rslora=true)', seed=2)
    graph = served.graph(**inputs())
    counter = CompileCounter()
    compiled_graph = torch.compile(graph, backend=counter)
    with torch.no_grad():
        compiled_graph(**inputs(), use_cache=False)
    for folder in (small, other):
        served.swap_adapter("default", folder)
        fresh = surgeon.compile("demo:llama", adapter=folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled_graph(**inputs(), use_cache=False).logits, _logits(fresh), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(served), _logits(fresh), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1  # swapping wrote into the same tensors: no recompile
    assert served.graph(**inputs()) is graph


def test_a_saved_program_takes_a_new_adapter_without_export(served, tmp_path):
    served.export(tmp_path / "program.pt2", fold=False)
    folder = _saved(tmp_path, "next", 'match "*.self_attn.v_proj" apply lora(r=2, alpha=6)', seed=3)
    program = swap_program_adapter(tmp_path / "program.pt2", folder, out=tmp_path / "swapped.pt2")
    fresh = surgeon.compile("demo:llama", adapter=folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs(), use_cache=False).logits, _logits(fresh), rtol=1e-5, atol=1e-5)
        again = torch.export.load(str(tmp_path / "swapped.pt2"))
        torch.testing.assert_close(again.module()(**inputs(), use_cache=False).logits, _logits(fresh), rtol=1e-5, atol=1e-5)


def test_a_larger_rank_or_another_site_is_a_clear_error(served, tmp_path):
    big = _saved(tmp_path, "big", 'match "*.self_attn.q_proj" apply lora(r=16)', seed=4)
    with pytest.raises(SurgeryError, match=r"rank 16 at model.layers.0.self_attn.q_proj; .* compiled with rank 8 .*\n.*lora\(r=16\)"):
        served.swap_adapter("default", big)
    elsewhere = _saved(tmp_path, "elsewhere", 'match "*.self_attn.k_proj" apply lora(r=4)', seed=5)
    with pytest.raises(SurgeryError, match="adapts model.layers.0.self_attn.k_proj, where this program has no LoRA site"):
        served.swap_adapter("default", elsewhere)


def test_a_site_with_a_bias_on_b_is_not_swapped_silently(tmp_path):
    biased = surgeon.compile("demo:llama", 'match "*.self_attn.q_proj" apply lora(r=4, bias=true)')
    folder = _saved(tmp_path, "plain", 'match "*.self_attn.q_proj" apply lora(r=2)', seed=6)
    with pytest.raises(SurgeryError, match="not made of plain LoRA"):
        biased.swap_adapter("default", folder)
