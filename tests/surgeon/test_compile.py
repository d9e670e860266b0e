"""surgeon.compile end to end: equal to PEFT, trains, folds, saves and loads PEFT's format."""

import pytest
import torch

import surgeon
from surgeon.capture.demos import build_demo, demo_config

from ._peft_reference import inputs, peft_twin, randomize_adapters

# (demo, rules, equivalent PEFT LoraConfig) with several ranks, rslora and skip
CASES = {
    "llama": (
        "llama",
        'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)\n'
        'match "*.mlp.down_proj" apply lora(r=4, alpha=8, rslora=true)\n'
        'match "*.layers.0.*" skip\n',
        dict(
            r=8,
            lora_alpha=16,
            target_modules=r".*layers\.[123]\.(self_attn\.(q|v)_proj|mlp\.down_proj)",
            rank_pattern={"down_proj": 4},
            alpha_pattern={"down_proj": 16},  # rslora 8/sqrt(4) = 4 = 16/4 without rslora
        ),
    ),
    "qwen2": ("qwen2", 'match type(Linear) where not name("lm_head") apply lora(r=4, alpha=8)', dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "gpt2": (
        "gpt2",
        'match "*.attn.c_attn" apply lora(r=8, alpha=32)\nmatch "*.mlp.c_fc" where layer >= 2 apply lora(r=2, alpha=2)',
        dict(r=8, lora_alpha=32, target_modules=r".*(attn\.c_attn|[23]\.mlp\.c_fc)", rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 2}, fan_in_fan_out=True),
    ),
    "bert": (
        "bert",
        'match "*.attention.self.{query,value}" apply lora(r=8, alpha=16, bias=true)',
        dict(r=8, lora_alpha=16, target_modules=["query", "value"], lora_bias=True),
    ),
}


@pytest.fixture(scope="module")
def compiled_cases():
    made = {}

    def get(case):
        if case not in made:
            demo, rules, _ = CASES[case]
            compiled = surgeon.compile(f"demo:{demo}", rules)
            randomize_adapters(compiled)
            made[case] = compiled
        return made[case]

    return get


def _call(model, demo, **kw):
    return model(**inputs(labels=demo != "bert", **kw))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_gradients_equal_peft(compiled_cases, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_cases(case)
    reference = peft_twin(compiled, demo, **peft_kwargs)
    compiled.eval(), reference.eval()  # no dropout anywhere: both are deterministic
    ours, theirs = _call(compiled, demo), _call(reference, demo)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    loss_ours = ours.loss if demo != "bert" else ours.logits.square().mean()
    loss_theirs = theirs.loss if demo != "bert" else theirs.logits.square().mean()
    loss_ours.backward()
    loss_theirs.backward()
    modules = dict(reference.named_modules())
    for _, path, weights in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        torch.testing.assert_close(weights.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
    compiled.zero_grad()


def test_the_adapted_model_starts_equal_to_the_base():
    compiled = surgeon.compile("demo:llama", 'match "*_proj" apply lora(r=4)')
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs()).logits, build_demo("llama")(**inputs()).logits, rtol=0, atol=0)


def test_training_changes_only_adapters_and_trained_modules_and_the_loss_goes_down():
    torch.manual_seed(0)
    compiled = surgeon.compile("demo:llama", 'match "*.{q,v}_proj" apply lora(r=8, alpha=16, dropout=0.05)\nmatch "lm_head" train')
    base_before = {k: v.clone() for k, v in compiled.base_model.state_dict().items()}
    trainable = {n: p.detach().clone() for n, p in compiled.trainable_parameters()}
    assert all(n.startswith(("adapters.", "trained.")) for n in trainable)
    optimizer = torch.optim.AdamW([p for _, p in compiled.trainable_parameters()], lr=1e-2)
    compiled.train()
    losses = []
    for _ in range(8):
        loss = compiled(**inputs()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    for k, v in compiled.base_model.state_dict().items():
        assert torch.equal(v, base_before[k]), k  # the user's model, lm_head included, is untouched
    changed = {n for n, p in compiled.trainable_parameters() if not torch.equal(p, trainable[n])}
    assert changed == set(trainable)


def test_train_and_eval_graphs_share_parameters_and_switch_dropout():
    compiled = surgeon.compile("demo:gpt2", 'match "*.c_attn" apply lora(r=4)')
    compiled.train()
    with torch.no_grad():
        a, b = compiled(**inputs()).logits, compiled(**inputs()).logits
    assert not torch.equal(a, b)  # GPT-2's own dropout is on in training
    compiled.eval()
    with torch.no_grad():
        c, d = compiled(**inputs()).logits, compiled(**inputs()).logits
    assert torch.equal(c, d)
    graphs = list(compiled._graphs.values())
    assert len(graphs) == 2
    a_params = [{id(p) for n, p in g.named_parameters() if n.endswith("__lora_A")} for g in graphs]
    assert a_params[0] == a_params[1] == {id(w.lora_A) for _, _, w in compiled.sites()}


def test_two_adapters_on_one_site_add_up():
    compiled = surgeon.compile(
        "demo:llama", 'match "*.mlp.gate_proj" apply lora(r=4, alpha=8)\nadapter "math" {\n  match type(Linear) where out_features >= 1024 apply lora(r=2)\n}\n'
    ).eval()
    randomize_adapters(compiled)
    assert len(compiled.plan.sites) == 4 + 8
    reference = build_demo("llama").eval()  # W + both deltas, computed in eager PyTorch
    reference.load_state_dict(compiled.merged_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs()).logits, reference(**inputs()).logits, rtol=1e-5, atol=1e-5)
    graph = next(iter(compiled._graphs.values()))
    outs = [n for n in graph.graph.nodes if n.meta.get("surgeon", {}).get("role") in ("out", "fused")]  # fused: lowered
    assert len(outs) == 12


def test_transformers_trainer_trains_a_compiled_model(tmp_path):
    import transformers

    class Texts(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = (torch.arange(12) * (i + 1) + 3) % 1000
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    torch.manual_seed(0)
    model = surgeon.compile("demo:llama", 'match "*.{q,v}_proj" apply lora(r=8, alpha=16)')
    before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.trainable_parameters())


def test_a_bfloat16_base_trains_float32_adapters_and_folds_within_bf16_tolerance():
    config, model_class = demo_config("llama")
    config.num_hidden_layers = 2  # three bfloat16 captures (eval, train, fold): two layers keep them short
    torch.manual_seed(0)
    base = model_class(config).eval().to(torch.bfloat16)
    rules = 'match "*.{q,v}_proj" apply lora(r=8, alpha=16)\nmatch "*.o_proj" apply dora(r=4)\nmatch "*.down_proj" apply ia3(feedforward=true)'
    compiled = surgeon.compile(base, rules).eval()
    assert {p.dtype for _, p in compiled.trainable_parameters()} == {torch.float32}  # as PEFT's autocast_adapter_dtype
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, adapter in compiled.sites():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    kwargs = inputs(labels=False)
    expected = compiled(**kwargs).logits
    assert expected.dtype == torch.bfloat16
    compiled.train()
    compiled(**inputs()).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in compiled.trainable_parameters())
    compiled.eval()
    folded = compiled.fold(kwargs=kwargs)  # verified at bfloat16 tolerance
    assert folded(**kwargs, use_cache=False).logits.dtype == torch.bfloat16
    handles = compiled.attach()
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled.base_model(**kwargs).logits, expected, rtol=0, atol=0)
    finally:
        for h in handles:
            h.remove()
