"""Compiled.generate against transformers' generate of the eager model with the same PEFT adapter.

Reference: ``PeftModel.from_pretrained(base, surgeon's saved adapter).generate(...)``, greedy, on a
left-padded batch; each architecture built tiny from its transformers config (tests/surgeon/_architectures.py).
"""

import copy
import subprocess
import sys

import pytest
import torch

import surgeon
from surgeon.diagnostics import SurgeryError

from tests.surgeon._architectures import ARCHITECTURES

# Every linear of attention and MLP: the update reaches every layer kind the decoder step runs.
RULES = 'match "*.layers.*.*_proj", "*.h.*.attn.c_attn", "*.h.*.mlp.c_fc", "*.query_key_value", "*.dense_h_to_4h" apply lora(r=4, alpha=8)'


def _compiled(arch: str, rules: str = RULES, seed: int = 0):
    torch.manual_seed(seed)
    base = ARCHITECTURES[arch][0]().eval()
    example = {"input_ids": torch.ones(2, 8, dtype=torch.long), "use_cache": False}
    compiled = surgeon.compile(copy.deepcopy(base), surgeon.parse(rules), example_inputs=example).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, module in compiled.sites():
            for param in module.parameters():
                param.normal_(0, 0.3, generator=generator)
    return base, compiled


def _prompt(seed: int = 0, batch: int = 3, tokens: int = 7):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, tokens), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of different lengths
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _peft(base, compiled, tmp_path, name=None):
    from peft import PeftModel

    directory = tmp_path / "adapter"
    compiled.save_adapter(directory)
    name = name or compiled.adapter_names[0]
    folder = directory if (directory / "adapter_config.json").exists() else directory / name
    return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox"])
def test_greedy_equals_peft_generate_on_a_left_padded_batch(arch, tmp_path):
    base, compiled = _compiled(arch)
    reference = _peft(base, compiled, tmp_path)
    ids, mask = _prompt()
    for model in (base, reference, compiled.base_model):  # no early stop: every step is compared
        model.generation_config.eos_token_id = None
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = compiled.generate(ids, mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(got, expected)
    assert not torch.equal(got, base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                              pad_token_id=0))  # the adapter changes the tokens


def test_rows_stop_at_eos_as_transformers_does(tmp_path):
    base, compiled = _compiled("llama")
    reference = _peft(base, compiled, tmp_path)
    ids, mask = _prompt()
    free = compiled.generate(ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 2])  # a token row 0 makes at its third step: that row stops there
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, eos_token_id=eos)
    assert expected.shape[1] < ids.shape[1] + 12 or (expected[0, ids.shape[1] + 3:] == 0).all()
    got = compiled.generate(ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == 0).all()


def test_routed_rows_equal_each_row_generated_alone_with_its_adapter():
    rules = 'adapter "a" { match "*.{q,v}_proj" apply lora(r=4, alpha=8) }\nadapter "b" { match "*.{q,v}_proj" apply lora(r=2, alpha=4) }'
    _, compiled = _compiled("llama", rules)
    ids, mask = _prompt(batch=3)
    routed = compiled.generate(ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None, adapter_ids=[0, 1, -1])
    for row, active in enumerate(["a", "b", None]):
        compiled.set_active(active)
        alone = compiled.generate(ids[row:row + 1], mask[row:row + 1], max_new_tokens=8, pad_token_id=0, eos_token_id=None)
        assert torch.equal(routed[row], alone[0])
    assert not torch.equal(routed[0], routed[1])


def test_set_active_between_calls_changes_tokens_without_a_new_graph():
    rules = 'adapter "a" { match "*.{q,v}_proj" apply lora(r=4, alpha=8) }\nadapter "b" { match "*.{q,v}_proj" apply lora(r=4, alpha=8) }'
    _, compiled = _compiled("llama", rules)
    ids, mask = _prompt()
    compiled.set_active("a")
    first = compiled.generate(ids, mask, max_new_tokens=6, eos_token_id=None)
    graphs = dict(compiled._graphs)
    compiled.set_active("b")
    second = compiled.generate(ids, mask, max_new_tokens=6, eos_token_id=None)
    compiled.set_active("a")
    again = compiled.generate(ids, mask, max_new_tokens=6, eos_token_id=None)
    assert compiled._graphs.keys() == graphs.keys() and all(compiled._graphs[k] is graphs[k] for k in graphs)
    assert not torch.equal(first, second) and torch.equal(first, again)


def test_folded_in_place_generation_equals_the_merged_peft_model(tmp_path):
    base, compiled = _compiled("qwen2")
    merged = _peft(base, compiled, tmp_path).merge_and_unload()
    ids, mask = _prompt()
    compiled.fold(inplace=True)
    got = compiled.generate(ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=-1)
    expected = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=-1)  # -1: no token, so no row stops early
    assert torch.equal(got, expected)


def test_sampling_with_the_same_seed_is_reproducible():
    _, compiled = _compiled("llama")
    ids, mask = _prompt()
    runs = [compiled.generate(ids, mask, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                              eos_token_id=None, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_p_and_top_k_keep_what_transformers_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from surgeon.runtime.decoding import next_tokens

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for warper, options in ((TopPLogitsWarper(0.7), dict(top_p=0.7)), (TopKLogitsWarper(5), dict(top_k=5))):
        kept = warper(None, logits.clone()).isfinite()
        for seed in range(30):  # every sampled token is one transformers keeps
            token = next_tokens(logits, do_sample=True, generator=torch.Generator().manual_seed(seed), **options)
            assert kept[torch.arange(4), token].all()


def test_bad_generation_requests_are_refused_before_any_work():
    _, compiled = _compiled("gpt2")  # 64 positions
    ids, mask = _prompt()
    with pytest.raises(SurgeryError, match="need 70 positions"):
        compiled.generate(ids, mask, max_new_tokens=63)
    with pytest.raises(SurgeryError, match="adapter_ids holds"):
        compiled.generate(ids, mask, max_new_tokens=2, adapter_ids=[0, 1, 0])
    with pytest.raises(SurgeryError, match="left padding"):
        compiled.generate(ids, mask.flip(1), max_new_tokens=2)
    assert not any(key[0] == "generate" for key in compiled._graphs)


def test_the_runtime_imports_torch_only():
    # ``import surgeon`` loads the torch-free table of method signatures (as ``surgeon check`` does); nothing else
    # of the compiler, and no transformers.
    code = ("import sys, surgeon.runtime; bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft') or "
            "m.startswith(('surgeon.capture', 'surgeon.planning', 'surgeon.passes', 'surgeon.kernels', "
            "'surgeon.compiled', 'surgeon.checkpoints', 'surgeon.api'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_folded_generation_equals_the_merged_peft_model(tmp_path):
    base, compiled = _compiled("llama")
    merged = _peft(base, compiled, tmp_path).merge_and_unload()
    ids, mask = _prompt()
    got = compiled.fold().generate(ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=-1)
    expected = merged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                               eos_token_id=-1)
    assert torch.equal(got, expected)
    assert torch.equal(got, compiled.generate(ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=-1))
