"""QLoRA: LoRA on bitsandbytes 4-bit and 8-bit bases (kernels/quantized.py) against PEFT's QLoRA layers."""

import tempfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import surgeon
from surgeon.api import plan
from surgeon.capture.demos import build_quantized_demo
from surgeon.grammar import SurgeryError

from ._peft_reference import exact_bnb_cpu_path, inputs, peft_twin, randomize_adapters

RULES = 'match "*.self_attn.{q,v,o}_proj", "*.mlp.down_proj" apply lora(r=4, alpha=8)'
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
# (rtol, atol) of logits and of gradients: bf16 compute rounds differently per op order
TOLERANCE = {"nf4": (1e-5, 1e-5), "int8": (1e-5, 1e-5), "nf4-dq-bf16": (2e-2, 2e-2)}


@pytest.fixture(scope="module")
def compiled_cases():
    made = {}

    def get(scheme):
        if scheme not in made:
            compiled = surgeon.compile(f"demo:llama-{scheme}", RULES).eval()
            randomize_adapters(compiled, seed=3)
            made[scheme] = compiled
        return made[scheme]

    return get


def _peft_twin(compiled, base):
    return exact_bnb_cpu_path(peft_twin(compiled, base, r=4, lora_alpha=8, target_modules=TARGETS).eval())


@pytest.mark.parametrize("scheme", sorted(TOLERANCE))
def test_quantized_lora_equals_pefts_qlora_logits_and_gradients(compiled_cases, scheme):
    compiled = compiled_cases(scheme)
    site = compiled.plan.sites[0]
    assert site.quantization.startswith(scheme.split("-")[0]) and site.module_type in ("Linear4bit", "Linear8bitLt")
    reference = _peft_twin(compiled, build_quantized_demo("llama", scheme))
    rtol, atol = TOLERANCE[scheme]
    ours, theirs = compiled(**inputs()).logits, reference(**inputs()).logits
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol * theirs.abs().max().item())
    ours.float().square().mean().backward()
    theirs.float().square().mean().backward()
    modules = dict(reference.named_modules())
    for _, path, weights in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        for mine, name in ((weights.lora_A, "lora_A"), (weights.lora_B, "lora_B")):
            expected = getattr(layer, name)["default"].weight.grad
            assert mine.dtype == torch.float32  # float32 adapters on any compute dtype, as PEFT's autocast
            torch.testing.assert_close(mine.grad, expected, rtol=rtol * 10, atol=atol * expected.abs().max().item())
    compiled.zero_grad()


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_training_moves_only_the_adapters_and_the_loss_falls(compiled_cases, scheme):
    compiled = compiled_cases(scheme)
    frozen = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    trainable = [p for p in compiled.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in compiled.base_model.parameters())
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    compiled.train()
    try:
        losses = []
        for _ in range(5):
            loss = compiled(**inputs()).loss
            loss.backward()
            # the first layer's adapters learn only through the quantized layers above them: dx flows
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        compiled.eval()
        with torch.no_grad():
            for p, saved in zip(trainable, before):
                p.copy_(saved)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(v, frozen[k]) for k, v in compiled.base_model.state_dict().items())


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_adapter_files_both_ways_with_peft(compiled_cases, scheme, tmp_path):
    compiled = compiled_cases(scheme)
    with torch.no_grad():
        expected = compiled(**inputs()).logits
    compiled.save_adapter(tmp_path / "ours")
    theirs = exact_bnb_cpu_path(PeftModel.from_pretrained(build_quantized_demo("llama", scheme), tmp_path / "ours").eval())
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = surgeon.compile(f"demo:llama-{scheme}", adapter=tmp_path / "theirs").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs()).logits, expected, rtol=1e-5, atol=1e-5)


def test_what_cannot_apply_to_quantized_sites_is_refused_with_the_rule_line(compiled_cases):
    captured = surgeon.capture_model(compiled_cases("nf4").base_model)  # planned again: no new quantization
    roles = {p.rsplit(".", 1)[-1]: captured.modules[p].role for p in captured.sites if ".layers.0." in p}
    assert roles == {"q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v", "o_proj": "attn.out",  # 4-bit sites too
                     "gate_proj": "mlp.gate", "up_proj": "mlp.up", "down_proj": "mlp.down"}
    cases = [
        ('match "*.self_attn.q_proj" apply dora(r=4)', "quantized-site", r"dora cannot adapt .* quantized \(nf4"),
        ('match "*.self_attn.q_proj" apply lora(r=4, bias=true)', "quantized-site", r"bias of B cannot be folded"),
        ('match "*.self_attn.q_proj" train', "quantized-train", r"cannot train .* in full"),
        ('match "*.self_attn.q_proj" apply lora(r=4, loftq_iter=2)', "loftq-iter", r"does nothing without"),
    ]
    for text, code, message in cases:
        with pytest.raises(SurgeryError, match=message) as caught:
            plan(captured, "# QLoRA\n" + text)
        (found,) = caught.value.diagnostics
        assert (found.code, found.span.line, found.span.column) == (code, 2, 1), text


def test_unquantized_bitsandbytes_layers_are_refused_and_the_model_is_left_as_it_was():
    import bitsandbytes as bnb

    fresh = torch.nn.Sequential(bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32), torch.nn.ReLU())  # never moved
    with pytest.raises(SurgeryError, match="is not quantized yet"):
        surgeon.compile(fresh, 'match type(Linear) apply lora(r=2)', example_inputs=(torch.randn(2, 16),))
    assert type(fresh[0]).__name__ == "Linear4bit"
    fp16 = torch.nn.Sequential(bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=True))
    with pytest.raises(SurgeryError, match="has_fp16_weights=True"):
        surgeon.compile(fp16, 'match type(Linear) apply lora(r=2)', example_inputs=(torch.randn(2, 16),))


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_folds_merge_in_full_precision_or_requantize_with_the_error_reported(compiled_cases, scheme, tmp_path):
    from transformers import AutoModelForCausalLM

    from surgeon.kernels.quantized import QUANTIZED_OPS

    compiled = compiled_cases(scheme)
    with torch.no_grad():
        unmerged = compiled(**inputs()).logits
    kept = lambda folded: sum(n.target in QUANTIZED_OPS for n in folded.graph(**inputs()).graph.nodes)  # noqa: E731
    dequantized = compiled.fold(kwargs=inputs())
    exact = dict(compiled.fold_report)
    assert kept(dequantized) == 28 - 16  # q, v, o, down of 4 layers are plain linears now; the rest stay quantized
    requantized = compiled.fold(kwargs=inputs(), quantized="requantize")
    extra = dict(compiled.fold_report)
    assert kept(requantized) == 28 and extra["quantized_sites"] == exact["quantized_sites"] == 16
    # dequantizing is exact for 4-bit (LLM.int8 also rounds the unmerged activations); requantizing adds error
    assert exact["max_abs_output_difference"] < (1e-4 if scheme == "nf4" else 5e-2) * unmerged.abs().max().item()
    assert extra["mean_abs_output_difference"] > 2 * exact["mean_abs_output_difference"]
    for mode, graph in (("dequantize", dequantized), ("requantize", requantized)):
        compiled.save_pretrained(tmp_path / mode, quantized=mode)
        reloaded = exact_bnb_cpu_path(AutoModelForCausalLM.from_pretrained(tmp_path / mode, device_map="cpu").eval())
        layer = reloaded.model.layers[0].self_attn.q_proj
        assert (type(layer).__name__ == "Linear") == (mode == "dequantize")
        # (the dequantized checkpoint has every linear in full precision; the graph keeps the unadapted ones
        # quantized, which for LLM.int8 rounds their activations)
        tolerance = 5e-2 * unmerged.abs().max().item() if (scheme, mode) == ("int8", "dequantize") else 1e-4
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs()).logits, graph(**inputs(), use_cache=False).logits, rtol=1e-4, atol=tolerance)
    before = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    with pytest.raises(SurgeryError, match="cannot fold in place: 16 adapted sites have quantized weights"):
        compiled.fold(inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in compiled.base_model.state_dict().items())  # refused before any write
    # chosen adapter strengths: the reference is the graph with those gates, for the check and the report
    half = compiled.fold(kwargs=inputs(), adapters={"default": 0.5})
    with torch.no_grad():
        compiled.set_gates({"default": 0.5})
        gated = compiled(**inputs()).logits
        compiled.set_gates({"default": 1.0})
        assert compiled.fold_report["max_abs_output_difference"] == (half(**inputs(), use_cache=False).logits - gated).abs().max().item()


def test_loftq_brings_the_4bit_model_closer_to_full_precision(compiled_cases):
    """LoftQ (surgeon/methods/lora/loftq.py) against the plain 4-bit model, both measured against the float32 model they
    were quantized from; more iterations re-quantize the base and shrink the error further."""
    from surgeon.capture.demos import build_demo

    with torch.no_grad():
        full = build_demo("llama")(**inputs()).logits
        with compiled_cases("nf4").disabled():
            plain_error = (compiled_cases("nf4")(**inputs()).logits - full).abs().mean().item()
    rules = 'match "*.self_attn.{q,k,v,o}_proj", "*.mlp.*_proj" apply lora(r=8, alpha=16, init="loftq", loftq_iter=2)'
    loftq = surgeon.compile("demo:llama-nf4", rules).eval()
    with torch.no_grad():
        loftq_error = (loftq(**inputs()).logits - full).abs().mean().item()
    assert loftq_error < 0.85 * plain_error, (loftq_error, plain_error)
    assert len(loftq.loftq_report) == 28
    assert all(r["after"] < 0.9 * r["before"] for r in loftq.loftq_report.values())
    with pytest.raises(SurgeryError, match="its weight is not quantized") as caught:
        plan("demo:llama", 'match "*.q_proj" apply lora(r=4, init="loftq")')
    assert caught.value.diagnostics[0].code == "loftq-unquantized"


def test_a_hand_built_linear4bit_model_and_its_saved_program():
    """bnb.nn.Linear4bit built by hand (no transformers): LoRA's output is the 4-bit product plus s B A x computed
    directly, and the .pt2 program keeps the quantized op (loaded again, it gives the same output)."""
    import bitsandbytes as bnb

    from surgeon.checkpoints.program import load_program

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(40, 48), torch.nn.GELU(), torch.nn.Linear(48, 24))
    model = torch.nn.Sequential(bnb.nn.Linear4bit(40, 48, quant_type="fp4", compute_dtype=torch.float32), torch.nn.GELU(),
                                bnb.nn.Linear4bit(48, 24, quant_type="fp4", compute_dtype=torch.float32))
    model.load_state_dict(dense.state_dict())
    model = exact_bnb_cpu_path(model.to("cpu").eval())  # the reference below is this model's own forward
    x = torch.randn(3, 40)
    compiled = surgeon.compile(model, 'match type(Linear) apply lora(r=2, alpha=4)', example_inputs=(x,)).eval()
    assert [s.quantization for s in compiled.plan.sites] == ["fp4 double-quant, blocks of 64, compute float32"] * 2  # bnb default
    randomize_adapters(compiled, seed=4)
    first, second = (compiled.adapter_module("default", p) for p in ("0", "2"))
    with torch.no_grad():
        hidden = torch.nn.functional.gelu(model[0](x) + first.scale * x @ first.lora_A.T @ first.lora_B.T)
        expected = model[2](hidden) + second.scale * hidden @ second.lora_A.T @ second.lora_B.T
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    path = Path(tempfile.mkdtemp()) / "program.pt2"
    compiled.export(path, fold=False)
    with torch.no_grad():
        torch.testing.assert_close(load_program(path).module()(x), expected, rtol=1e-5, atol=1e-5)


def test_kbit_training_preparation_equals_pefts_on_a_bf16_qlora_model():
    """compile(kbit_training=True) against PEFT's prepare_model_for_kbit_training (without its gradient
    checkpointing) then get_peft_model, on the bf16 double-quant NF4 Llama: norms and embeddings float32 in both,
    the same logits and adapter gradients."""
    from peft import prepare_model_for_kbit_training

    compiled = surgeon.compile("demo:llama-nf4-dq-bf16", RULES, kbit_training=True).eval()
    randomize_adapters(compiled, seed=3)
    assert compiled.base_model.model.norm.weight.dtype == torch.float32
    model = prepare_model_for_kbit_training(build_quantized_demo("llama", "nf4-dq-bf16"), use_gradient_checkpointing=False)
    reference = _peft_twin(compiled, model)
    modules = dict(reference.named_modules())
    assert reference.base_model.model.model.norm.weight.dtype == torch.float32
    ours, theirs = compiled(**inputs()).logits, reference(**inputs()).logits
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2 * theirs.abs().max().item())
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for _, path, weights in compiled.sites():
        expected = modules[f"base_model.model.{path}"].lora_B["default"].weight.grad
        torch.testing.assert_close(weights.lora_B.grad, expected, rtol=0.2, atol=2e-2 * expected.abs().max().item())
