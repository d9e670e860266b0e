"""What a PEFT file cannot hold (issue 18, point 7).

Saving rules that PEFT's adapter_config.json cannot express warns, naming the
sites, checked against what PEFT's own loader makes of the folder; surgeon
reloads its own folder exactly from its record in the safetensors metadata
(and falls back to the config, saying so, when the record does not fit);
rules-from-peft prints rules a person would write; and every field of PEFT's
config dataclasses is read, inert, or refused by name.
"""

import dataclasses
import json
import re
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import surgeon
from surgeon.checkpoints.peft import AdapterError, PeftFidelityWarning, rules_from_peft, rules_from_peft_folder
from surgeon.checkpoints.peft_fields import peft_fields
from surgeon.methods.peft_format import path_globs
from surgeon.checkpoints.peft_record import RECORD_KEY
from surgeon.cli import main
from surgeon.capture.demos import build_demo
from surgeon.grammar.glob import compile_glob

# q_proj's dropout and o_proj's rslora are what one LoraConfig cannot say beside the others
RULES = """
match "*.q_proj" apply lora(r=4, dropout=0.05)
match "*.{k,v}_proj" apply lora(r=4)
match "*.o_proj" apply lora(r=16, alpha=16, rslora=true)
match "lm_head" train
"""
NESTED = re.compile(r"\{[^}]*\{")  # a brace opened inside another


@pytest.fixture(scope="module")
def compiled():
    return surgeon.compile("demo:llama", RULES)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fidelity") / "adapter"
    with pytest.warns(PeftFidelityWarning) as caught:
        compiled.save_adapter(folder)
    return folder, [str(w.message) for w in caught if w.category is PeftFidelityWarning]


def _configs(model, adapter="default"):
    """path -> config of a compiled model's (or a plan's) sites of one adapter."""
    return {s.path: s.config for s in getattr(model, "plan", model).sites if s.adapter == adapter}


def _peft_layers(folder):
    """PEFT's own reading of the folder: module path -> (dropout p, scaling, r)."""
    model = peft.PeftModel.from_pretrained(build_demo("llama"), str(folder))
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            dropout = module.lora_dropout["default"]
            found[name.removeprefix("base_model.model.")] = (getattr(dropout, "p", 0.0), module.scaling["default"], module.r["default"])
    return found


def test_saving_names_the_sites_that_peft_reads_otherwise(compiled, saved):
    folder, messages = saved
    rules = _configs(compiled)
    layers = _peft_layers(folder)
    assert set(layers) == set(rules)
    # PEFT computes every site's scale (o_proj's rslora is kept in alpha_pattern) and rank ...
    for path, config in rules.items():
        assert layers[path][1:] == pytest.approx((config.scale, config.r)), path
    # ... but holds one lora_dropout: the warning names exactly the sites where PEFT's differs from the rules
    differ = sorted(p for p, c in rules.items() if layers[p][0] != c.dropout)
    assert differ == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    (message,) = messages
    assert f"dropout=0.0 instead of 0.05 on {', '.join(path_globs(differ))}." in message


def test_surgeon_reloads_its_own_folder_with_every_sites_settings(compiled, saved):
    folder, _ = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftFidelityWarning)  # the record fits: no fallback
        compiled.load_adapter(folder, name="again")
        again = surgeon.compile("demo:llama", adapter=folder)
    assert _configs(compiled, "again") == _configs(compiled) == _configs(again)
    assert {t.path for t in again.plan.trained} == {"lm_head"}
    for _, path, module in compiled.sites():
        if path in _configs(compiled, "again"):
            assert torch.equal(compiled.adapter_module("again", path).lora_A, compiled.adapter_module("default", path).lora_A)


def _rewrite(folder, tmp_path, config=None, record=None, tensors=None):
    """A copy of the adapter folder with its config, record (None: without one) and/or tensors changed."""
    copy = tmp_path / "copy"
    copy.mkdir()
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    if record is not None:
        metadata[RECORD_KEY] = record(json.loads(metadata[RECORD_KEY]))
        if metadata[RECORD_KEY] is None:
            del metadata[RECORD_KEY]
    save_file(tensors(weights) if tensors else weights, str(copy / "adapter_model.safetensors"), metadata=metadata)
    text = json.loads((folder / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(config(text) if config else text))
    return copy


def _with_site(body, **changes):
    body["sites"][0].update(changes)
    return json.dumps(body)


@pytest.mark.parametrize(
    "change, why",
    [
        (dict(config=lambda c: dict(c, lora_dropout=0.1)), "adapter_config.json was changed after surgeon wrote it"),
        (dict(record=lambda b: "{not json"), "it is not JSON"),
        (dict(record=lambda b: _with_site(b, config={"r": "4"})), "surgeon's rules checker refuses it"),
        (dict(record=lambda b: _with_site(b, config={"r": 4, "lora_dropout": 0.5})), "refuses it (lora has no argument"),
        (dict(record=lambda b: _with_site(b, method="ia3")), "which a LORA file does not hold"),
        # a path is a literal, never a glob: "*" names no module the weights hold
        (dict(record=lambda b: _with_site(b, path="model.layers.*.self_attn.q_proj")), "of a module it does not list"),
    ],
)
def test_a_record_that_does_not_fit_gives_way_to_the_peft_config_and_says_so(compiled, saved, tmp_path, change, why):
    copy = _rewrite(saved[0], tmp_path, **change)
    with pytest.warns(PeftFidelityWarning, match=re.escape(why)):
        compiled.load_adapter(copy, name="fallback")
    expected = 0.1 if "config" in change else 0.0  # PEFT's one lora_dropout, on every site
    assert {c.dropout for c in _configs(compiled, "fallback").values()} == {expected}


def test_tensors_an_adapted_module_should_not_have_are_not_blamed_on_the_base_model(compiled, saved, tmp_path):
    # DoRA's magnitude in a file whose config says plain LoRA: a setting the reading missed, not another model
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    copy = _rewrite(saved[0], tmp_path, record=lambda body: None, tensors=lambda t: dict(t, **{key: torch.ones(64)}))
    with pytest.raises(AdapterError, match=re.escape(key)) as caught:
        compiled.load_adapter(copy, name="odd")
    assert caught.value.diagnostics[0].hint == "the adapter uses a PEFT setting surgeon does not read?"


def test_rules_from_peft_prints_surgeons_own_folder_as_its_rules(compiled, saved, capsys):
    assert main(["rules-from-peft", str(saved[0])]) == 0
    text = capsys.readouterr().out
    assert "rslora=true" in text and "alpha=64" not in text  # the flag, with alpha as written
    assert not NESTED.search(text) and '"*.model' not in text  # each site's path once, braces flat
    assert _configs(surgeon.plan("demo:llama", text)) == _configs(compiled)


def test_rules_from_a_peft_adapter_adapt_what_peft_adapts(tmp_path):
    """PEFT's full-path targets, rslora and patterns, read back as rules that plan PEFT's layers with PEFT's scales."""
    targets = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1, 2) for p in ("q_proj", "v_proj")]
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=targets, rank_pattern={"v_proj": 8},
                             alpha_pattern={r"model\.layers\.2\.self_attn\.q_proj": 2})
    peft.get_peft_model(build_demo("llama"), config).save_pretrained(tmp_path)
    text = rules_from_peft_folder(tmp_path)
    assert "rslora=true" in text and not NESTED.search(text)
    planned = {s.path: (s.config.scale, s.config.r) for s in surgeon.plan("demo:llama", text).sites}
    layers = _peft_layers(tmp_path)
    assert set(planned) == set(layers)
    for path, (scale, r) in planned.items():
        assert (scale, r) == (pytest.approx(layers[path][1]), layers[path][2]), path


def test_path_globs_match_exactly_the_names_given():
    universe = [f"model.layers.{i}.{block}.{p}" for i in range(3) for block in ("mlp", "attn") for p in ("up", "down", "q")]
    universe += ["we\"ird*{x},y", "we\"ird.a", "a\\b", "lm_head"]
    for names in (universe[::2], universe[1::3], universe[:7], universe[-3:], ["lm_head"]):
        globs = path_globs(names)
        assert not any(NESTED.search(re.sub(r"\\.", "", g)) for g in globs)  # escaped braces are literal
        assert {u for u in universe if any(compile_glob(g).fullmatch(u) for g in globs)} == set(names)


# --- every PEFT config field: read, inert or refused ---------------------------------------------------------

PEFT_CLASSES = {
    "LORA": peft.LoraConfig(target_modules=["q_proj"]),
    "LOHA": peft.LoHaConfig(target_modules=["q_proj"]),
    "LOKR": peft.LoKrConfig(target_modules=["q_proj"]),
    "IA3": peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]),
    "OFT": peft.OFTConfig(target_modules=["q_proj"]),
    "VERA": peft.VeraConfig(target_modules=["q_proj"]),
    "TRAINABLE_TOKENS": peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 2]),
}


def _saved_config(peft_type, tmp_path):
    """The adapter_config.json PEFT writes for its defaults."""
    PEFT_CLASSES[peft_type].save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def _defaults(peft_type) -> dict:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(type(PEFT_CLASSES[peft_type]))}


def test_every_field_of_pefts_configs_is_read_inert_or_refused():
    from surgeon.methods import method_names
    from surgeon.methods.adapter import adapter_class

    assert set(peft_fields()) == {adapter_class(m).peft_type for m in method_names()} - {""} == set(PEFT_CLASSES)
    for peft_type, fields in peft_fields().items():
        groups = [set(fields["read"]), set(fields["inert"]), set(fields["refused"]), set(fields.get("warned", {}))]
        assert sum(map(len, groups)) == len(set().union(*groups)), peft_type  # no field in two groups
        assert set().union(*groups) == set(_defaults(peft_type)), peft_type  # a field PEFT adds fails here
        for name, default in {**fields["refused"], **fields.get("warned", {})}.items():
            assert _defaults(peft_type)[name] == default, (peft_type, name)


def _non_default(default):
    """A value other than PEFT's default: PEFT's own spelling where it has one, else a config object."""
    if default is False:
        return True
    return "all" if default == "none" else {"x": 1}


REFUSED = [(t, f) for t, fields in peft_fields().items() for f in fields["refused"]]


@pytest.mark.parametrize("peft_type, field", REFUSED, ids=[f"{t}-{f}" for t, f in REFUSED])
def test_a_field_surgeon_does_not_implement_is_refused_by_name(peft_type, field, tmp_path):
    config = _saved_config(peft_type, tmp_path)
    rules_from_peft(config)  # PEFT's defaults read
    with pytest.raises(AdapterError, match=rf"{peft_type}'s {field} is not supported"):
        rules_from_peft(dict(config, **{field: _non_default(_defaults(peft_type)[field])}))


@pytest.mark.parametrize("change", [dict(lora_bias=True), dict(init_lora_weights="pissa")])
def test_dora_refuses_what_surgeons_dora_does_not_have(change, tmp_path):
    config = dict(_saved_config("LORA", tmp_path), use_dora=True)
    assert "apply dora(r=8, alpha=8)" in rules_from_peft(config)
    with pytest.raises(AdapterError, match=f"use_dora with {next(iter(change))}"):
        rules_from_peft(dict(config, **change))


def test_config_values_never_become_rules_text_unchecked(tmp_path):
    config = _saved_config("LORA", tmp_path)
    for bad in (dict(lora_dropout='0.1)\nmatch "*" train\n#'), dict(r=True), dict(future_field=3)):
        with pytest.raises(AdapterError, match=next(iter(bad))):
            rules_from_peft(dict(config, **bad))
    # a target is matched as the literal name PEFT matches, quotes and glob characters included
    (rule,) = surgeon.parse(rules_from_peft(dict(config, target_modules=['we"ird*{x}']))).rules
    assert [s.matches('a.we"ird*{x}') for s in rule.selectors] == [False, True]
    assert not any(s.matches('a.we"irdXX{x}') for s in rule.selectors)
