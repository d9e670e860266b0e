"""Fold, unfold, PEFT-format adapters both ways, merged checkpoints, .pt2 programs, and bad input."""

import json

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import surgeon
from surgeon.checkpoints.peft import AdapterError, rules_from_peft
from surgeon.capture.demos import build_demo
from surgeon.grammar import SurgeryError

from ._peft_reference import inputs, randomize_adapters

RULES = (
    'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)\n'
    'match "*.mlp.down_proj" where layer >= 2 apply lora(r=4, alpha=8, rslora=true)\n'
    'match "lm_head" train\n'
)


@pytest.fixture(scope="module")
def llama():
    compiled = surgeon.compile("demo:llama", RULES)
    randomize_adapters(compiled)
    with torch.no_grad():
        compiled.trained["lm_head"].weight.mul_(1.5)
    return compiled.eval()


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_fold_matches_unfolded_and_gives_back_the_base_op_sequence(llama):
    folded = llama.fold()  # verifies itself
    with torch.no_grad():
        # a graph is called with the exact keyword arguments it was captured with
        torch.testing.assert_close(folded(**inputs(), use_cache=False).logits, llama(**inputs()).logits, rtol=1e-4, atol=1e-5)
    assert _ops(folded.graph()) == _ops(llama.base_graph())  # the graph of the example signature
    assert not any(".surgeon_" in n for n, _ in folded.graph().named_parameters())
    # the user's model and the compiled model are untouched
    assert any(".surgeon_" in n for g in llama._graphs.values() for n, _ in g.named_parameters())


def test_inplace_fold_and_unfold_restore_the_base_bit_for_bit():
    compiled = surgeon.compile("demo:gpt2", 'match "*.c_attn" apply lora(r=4)').eval()
    randomize_adapters(compiled)
    before = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    expected = compiled(**inputs()).logits.detach()
    compiled.fold(inplace=True)
    weight = compiled.base_model.transformer.h[0].attn.c_attn.weight
    assert not torch.equal(weight, before["transformer.h.0.attn.c_attn.weight"])
    with torch.no_grad():  # the user's eager model is now merged, as PEFT's merge_and_unload
        torch.testing.assert_close(compiled.base_model(**inputs()).logits, expected, rtol=1e-4, atol=1e-5)
    compiled.unfold()
    for k, v in compiled.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_saved_adapter_loads_in_peft_with_the_same_logits(llama, tmp_path):
    llama.save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 8, 16, False)
    assert config["rank_pattern"] == {r"model\.layers\.2\.mlp\.down_proj": 4, r"model\.layers\.3\.mlp\.down_proj": 4}
    # rslora with r=4, alpha=8 scales by 8/sqrt(4) = 4 = 16/4: the default alpha already gives it
    assert config["alpha_pattern"] == {}
    assert config["modules_to_save"] == ["lm_head"]
    peft_model = PeftModel.from_pretrained(build_demo("llama"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs()).logits, llama(**inputs()).logits, rtol=1e-5, atol=1e-5)


def test_peft_saved_adapter_loads_in_surgeon_with_the_same_logits(tmp_path):
    reference = get_peft_model(
        build_demo("gpt2"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, fan_in_fan_out=True, modules_to_save=["lm_head"]),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    reference.save_pretrained(tmp_path / "peft")
    compiled = surgeon.compile("demo:gpt2", adapter=tmp_path / "peft").eval()
    assert {s.path for s in compiled.plan.sites} == {f"transformer.h.{i}.{m}" for i in range(4) for m in ("attn.c_attn", "mlp.c_fc")}
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs()).logits, reference(**inputs()).logits, rtol=1e-5, atol=1e-5)


def test_rules_from_peft_text():
    text = rules_from_peft({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]})
    assert text.splitlines()[1:] == [
        'match "{q_proj,v_proj}", "*.{q_proj,v_proj}" apply lora(r=8, alpha=16)',
        'match "lm_head", "*.lm_head" train',
    ]


def test_merged_checkpoint_reloads_in_transformers_with_the_folded_outputs(llama, tmp_path):
    llama.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs()).logits, llama(**inputs()).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_pt2_round_trip_at_new_shapes(llama, tmp_path, fold):
    path = tmp_path / f"model-{fold}.pt2"
    llama.export(path, fold=fold)
    program = torch.export.load(str(path)).module()
    for batch, seq in ((1, 3), (4, 19)):
        kwargs = inputs(batch, seq)
        kwargs["use_cache"] = False
        with torch.no_grad():
            torch.testing.assert_close(program(**kwargs).logits, llama(**inputs(batch, seq)).logits, rtol=1e-4, atol=1e-5)


def test_attach_makes_the_eager_model_generate_with_the_adapter(llama):
    base = llama.base_model
    prompt = inputs(1, 5, labels=False)
    plain = base.generate(**prompt, max_new_tokens=6, do_sample=False)
    handles = llama.attach()
    try:
        with torch.no_grad():
            torch.testing.assert_close(base(**inputs()).logits, llama(**inputs()).logits, rtol=1e-5, atol=1e-5)
        adapted = base.generate(**prompt, max_new_tokens=6, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert not torch.equal(plain, adapted)
    assert torch.equal(base.generate(**prompt, max_new_tokens=6, do_sample=False), plain)


# --- bad input: clear errors, nothing half-written ----------------------------------------


def test_an_adapter_for_another_model_is_refused(llama, tmp_path):
    llama.save_adapter(tmp_path / "llama-adapter")
    with pytest.raises(SurgeryError) as caught:
        surgeon.compile("demo:gpt2", adapter=tmp_path / "llama-adapter")
    assert caught.value.diagnostics[0].code == "no-match"
    qwen = surgeon.compile("demo:qwen2", 'match "*.q_proj" apply lora(r=8)')  # same names, other shapes
    with pytest.raises(AdapterError, match="has shape"):
        qwen.load_adapter(tmp_path / "llama-adapter")


def test_truncated_safetensors_and_missing_config_keys(llama, tmp_path):
    folder = tmp_path / "a"
    llama.save_adapter(folder)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="the file is truncated or not safetensors"):
        llama.load_adapter(folder, name="again")
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["r"], config["target_modules"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as caught:
        llama.load_adapter(folder, name="again")
    assert caught.value.diagnostics[0].message.endswith("adapter_config.json lacks r, target_modules")
    assert "again" not in llama.adapter_names


def test_output_folder_that_is_a_file(llama, tmp_path):
    target = tmp_path / "taken"
    target.write_text("precious")
    with pytest.raises(SurgeryError, match="it is a file, not a folder"):
        llama.save_adapter(target)
    with pytest.raises(SurgeryError, match="it is a file, not a folder"):
        llama.save_pretrained(target)
    assert target.read_text() == "precious"


def test_a_failed_save_leaves_the_previous_adapter_intact(llama, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    llama.save_adapter(folder)
    before = (folder / "adapter_model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("surgeon.checkpoints.peft.save_file", crash)
    with pytest.raises(OSError):
        llama.save_adapter(folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_folder_of_several_adapters_round_trips_with_every_adapter(tmp_path):
    rules = 'match "*.q_proj" apply lora(r=4)\nadapter "math" {\n  match "*.mlp.up_proj" apply lora(r=2, alpha=4)\n}\n'
    compiled = surgeon.compile("demo:llama", rules).eval()
    randomize_adapters(compiled)
    compiled.save_adapter(tmp_path / "both")
    assert (tmp_path / "both" / "math" / "adapter_config.json").is_file()
    again = surgeon.compile("demo:llama", adapter=tmp_path / "both").eval()
    assert again.adapter_names == ("default", "math")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).logits, compiled(**inputs()).logits, rtol=1e-5, atol=1e-5)


def test_written_files_get_the_usual_permissions(llama, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        llama.save_adapter(tmp_path / "a")
    finally:
        os.umask(mask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644


def test_in_place_fold_refuses_a_tied_weight_but_fold_keeps_the_tie_apart():
    from surgeon.passes import FoldError

    compiled = surgeon.compile("demo:gpt2", 'match "transformer.wte" apply lora(r=2)').eval()
    randomize_adapters(compiled)
    with torch.no_grad():
        compiled.adapter_module("default", "transformer.wte").lora_A.normal_()
    with pytest.raises(FoldError, match="the tensor is shared with another weight"):
        compiled.fold(inplace=True)
    assert compiled.base_model.lm_head.weight is compiled.base_model.transformer.wte.weight
    folded = compiled.fold()  # the merged graph: wte changes, lm_head keeps the base weight, as unfolded
    with torch.no_grad():
        torch.testing.assert_close(folded(**inputs(), use_cache=False).logits, compiled(**inputs()).logits, rtol=1e-4, atol=1e-5)


def test_write_artifacts_writes_what_compile_o_writes_and_each_artifact_computes_the_model(llama, tmp_path):
    from surgeon.checkpoints.program import load_program

    out = tmp_path / "out"
    written = surgeon.write_artifacts(llama, out, fold=True)
    assert written == ["plan.json", "adapter/", "program.pt2", "merged/", "merged.pt2"]
    assert sorted(p.name for p in out.iterdir()) == [".surgeon-output.json", "adapter", "merged", "merged.pt2", "plan.json",
                                                     "program.pt2"]
    batch = inputs()
    with torch.no_grad():
        expected = llama(**batch).logits
        for program in ("program.pt2", "merged.pt2"):
            got = load_program(out / program).module()(**batch, use_cache=False).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "plan.json").read_text())["totals"] == llama.plan.totals()
