"""Adapter folders that strangers made (issue 19, "Hostile input").

A folder's configs are data, never code: rules are built from typed values
as objects and text is only printed from them, so no value adds a rule; every
field is type-checked; files a folder names lie inside it; tensors are
floating point and fit the planned adapter before anything is allocated; and a
load that fails leaves the model exactly as it was (compared bit for bit).
"""

import json
import os
import shutil
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import surgeon
from surgeon.checkpoints import peft as peft_module
from surgeon.checkpoints.peft import AdapterError, rules_from_peft_folder
from surgeon.checkpoints.peft_folder import SAVING
from surgeon.grammar import SurgeryError

RULES = 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=16)\n'
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def compiled():
    model = surgeon.compile("demo:llama", RULES).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: B is no longer zero, so losing it changes the logits
        for _, _, module in model.sites():
            module.lora_B.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "A"
    compiled.save_adapter(folder)
    return folder


def _variant(saved, tmp_path, name="V", tensors=None, **fields):
    """``A[k=v]``: a copy of the saved folder with config fields (and/or its tensors) changed."""
    copy = tmp_path / name
    shutil.copytree(saved, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps(dict(config, **fields)))
    if tensors is not None:
        with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
            weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        save_file(tensors(weights), str(copy / "adapter_model.safetensors"), metadata=metadata)
    return copy


def _state(model):
    """Everything a failed load must not change: names, active adapters, every tensor, the logits."""
    with torch.no_grad():
        logits = model(**model.example_kwargs).logits.clone()
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model.adapter_names, model.active_adapters, tensors, logits, [p.path for p in model.plan.trained]


def _assert_same(model, before):
    names, active, tensors, logits, trained = _state(model)
    assert (names, active, trained) == before[:2] + (before[4],)
    assert tensors.keys() == before[2].keys()
    assert all(torch.equal(tensors[k], before[2][k]) for k in tensors)
    assert torch.equal(logits, before[3])


def _refused(model, folder, match, name="default"):
    """Loading ``folder`` fails with an AdapterError/SurgeryError matching ``match``, and changes nothing."""
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a record that no longer fits the edited config says so
        with pytest.raises(SurgeryError, match=match):
            model.load_adapter(folder, name=name)
    _assert_same(model, before)


# --- injection: config values are data, never rules text ------------------------------------------------------


def test_a_dropout_holding_rules_text_is_refused_not_run(compiled, saved, tmp_path):
    folder = _variant(saved, tmp_path, lora_dropout='0.0)\nmatch "*.q_proj" apply lora(r=8, alpha=8000, dropout=0.0')
    _refused(compiled, folder, "lora_dropout must be a number")
    with pytest.raises(AdapterError, match="lora_dropout"):
        rules_from_peft_folder(folder)


def test_a_base_model_name_stays_inside_its_comment(saved, tmp_path):
    folder = _variant(saved, tmp_path, base_model_name_or_path='x)\nmatch "*.o_proj" train\n#')
    text = rules_from_peft_folder(folder)
    (rule,) = surgeon.parse(text).rules  # the one apply rule: no train rule came out of the header
    assert str(rule.action).startswith("apply lora(r=8, alpha=16)")
    assert text.splitlines()[0].startswith("# from a PEFT") and text.count("\n") == 2


def test_a_target_regex_holding_a_line_break_is_refused(compiled, saved, tmp_path):
    folder = _variant(saved, tmp_path, target_modules='.*q_proj" apply lora(r=8)\nmatch "*')
    with pytest.raises(AdapterError, match="target_modules holds the control character"):
        rules_from_peft_folder(folder)
    _refused(compiled, folder, "control character")


def test_a_target_regex_with_quotes_matches_as_a_regex_only(compiled, saved, tmp_path):
    folder = _variant(saved, tmp_path, target_modules='.*q_proj" apply lora(r=8) "x')
    (rule,) = surgeon.parse(rules_from_peft_folder(folder)).rules
    assert len(rule.selectors) == 1 and not rule.selectors[0].matches("model.layers.0.self_attn.q_proj")


def test_a_subfolder_named_like_rules_makes_no_adapter(compiled, saved, tmp_path):
    top = tmp_path / "many"
    shutil.copytree(saved, top / 'q" {\n match "*k_proj" apply lora(r=2)\n}\nadapter "zz')
    with pytest.raises(SurgeryError, match="adapter name"):
        rules_from_peft_folder(top)
    before = _state(compiled)
    with pytest.raises(SurgeryError, match="adapter name"):
        compiled.load_adapter(top)
    _assert_same(compiled, before)


@pytest.mark.parametrize("fields, match", [
    (dict(target_modules=5), "target_modules must be"),
    (dict(rank_pattern=[1, 2]), "rank_pattern must be"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a number"),
    (dict(inference_mode="yes"), "inference_mode must be true or false"),
    (dict(peft_type={"LORA": 1}), "peft_type must be a name"),
    (dict(alpha_pattern={"q\rproj": 2}), "control character"),
])
def test_every_field_is_type_checked(compiled, saved, tmp_path, fields, match):
    folder = _variant(saved, tmp_path, **fields)
    with pytest.raises(AdapterError, match=match):
        rules_from_peft_folder(folder)
    _refused(compiled, folder, match)


@pytest.mark.parametrize("mixture, match", [
    (dict(parts={"lora": 5}), "parts' must be"),
    (dict(parts={"nope": "mixture/lora"}), "not a method"),
    (dict(methods="lora"), "methods' must be"),
    (dict(format_version=True), "format_version' must be"),
    (dict(stray=[1]), "'stray' must be absent"),
    (dict(parts={"lora": "mixture/lora", "dora": "mixture/lora"}), "holds a LORA adapter|same subfolder"),
    (dict(parts={"lora": "../A"}), "outside"),
])
def test_a_mixture_config_is_type_checked(compiled, saved, tmp_path, mixture, match):
    folder = tmp_path / "mix"
    shutil.copytree(saved, folder / "mixture" / "lora")
    config = {"peft_type": "SURGEON_MIXTURE", "format_version": 1, "methods": ["lora"], "parts": {"lora": "mixture/lora"}}
    (folder / "adapter_config.json").write_text(json.dumps(dict(config, **mixture)))
    with pytest.raises(AdapterError, match=match):
        rules_from_peft_folder(folder)
    _refused(compiled, folder, match)


def test_no_rules_text_is_stored_or_read(compiled, saved, tmp_path):
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        assert "surgeon_rules" not in f.metadata()
    # a planted rules text in the metadata is never read
    planted = _variant(saved, tmp_path, tensors=lambda t: t)
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        weights, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(weights, str(planted / "adapter_model.safetensors"), metadata=dict(metadata, surgeon_rules='match "*.o_proj" train\n'))
    fresh = surgeon.compile("demo:llama", RULES)
    fresh.load_adapter(planted)
    assert not list(fresh.plan.trained)  # the planted text would have trained o_proj


# --- data lost or silently wrong: a failed load changes nothing -------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (dict(r=4), "has shape"),
    (dict(r=10**9), r"needs \(1000000000, "),  # checked on the meta device: nothing is allocated
    (dict(tensors=lambda t: {k: v for k, v in t.items() if k != KEY}), "no weights for"),
    (dict(tensors=lambda t: dict(t, **{"base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.ones(8, 64)})),
     "does not fit this model"),
    (dict(tensors=lambda t: dict(t, **{KEY: t[KEY].to(torch.int64)})), f"{KEY} holds int64 values"),
    (dict(tensors=lambda t: dict(t, **{KEY: t[KEY] > 0})), f"{KEY} holds bool values"),
    (dict(tensors=lambda t: dict(t, **{KEY: t[KEY] * float("inf")})), "NaN or infinite"),
])
@pytest.mark.parametrize("name", ["default", "t1"])
def test_a_failed_load_leaves_the_model_exactly_as_it_was(compiled, saved, tmp_path, change, match, name):
    change = dict(change)
    folder = _variant(saved, tmp_path, tensors=change.pop("tensors", None), **change)
    _refused(compiled, folder, match, name=name)


def test_replacing_an_adapter_by_a_good_file_still_works(saved, tmp_path):
    model = surgeon.compile("demo:llama", RULES)
    before = model(**model.example_kwargs).logits
    model.load_adapter(saved)  # into "default": the saved (trained) B replaces the fresh one
    after = model(**model.example_kwargs).logits
    assert model.adapter_names == ("default",) and not torch.equal(before, after)
    reference = surgeon.compile("demo:llama", adapter=saved)
    assert torch.equal(reference(**reference.example_kwargs).logits, after)


def test_a_weights_file_linked_from_outside_the_folder_is_refused(compiled, saved, tmp_path):
    folder = tmp_path / "linked"
    folder.mkdir()
    shutil.copy(saved / "adapter_config.json", folder)
    os.symlink(saved / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    _refused(compiled, folder, "lies outside")
    outside = tmp_path / "other"
    shutil.copytree(saved, outside)
    (tmp_path / "top").mkdir()
    os.symlink(outside, tmp_path / "top" / "sub")  # an adapter subfolder that is a link elsewhere
    with pytest.raises(AdapterError, match="lies outside"):
        rules_from_peft_folder(tmp_path / "top")


def test_a_save_cut_short_between_its_files_is_refused_and_a_later_save_heals_it(saved, tmp_path, monkeypatch):
    folder = tmp_path / "torn"
    shutil.copytree(saved, folder)
    (folder / "notes.txt").write_text("mine")
    shutil.copytree(saved, folder / "other")  # another adapter's subfolder
    model = surgeon.compile("demo:llama", 'match "*.self_attn.{q,v}_proj" apply lora(r=8, alpha=64)\n')
    real = peft_module.write_text

    def crash(target, text):
        if target.name == "adapter_config.json":
            raise OSError("disk full")  # after adapter_model.safetensors was replaced
        real(target, text)

    monkeypatch.setattr(peft_module, "write_text", crash)
    with pytest.raises(OSError):
        model.save_adapter(folder, adapters=["default"])
    monkeypatch.undo()
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 16  # the old config ...
    fresh = surgeon.compile("demo:llama", RULES).eval()
    _refused(fresh, folder, "did not finish")  # ... beside weights for alpha=64: refused
    with pytest.raises(AdapterError, match="did not finish"):
        rules_from_peft_folder(folder)
    model.save_adapter(folder, adapters=["default"])
    assert not (folder / SAVING).exists() and (folder / "notes.txt").read_text() == "mine"
    assert (folder / "other" / "adapter_model.safetensors").is_file()
    fresh.load_adapter(folder)
    assert {s.config.scale for s in fresh.plan.sites if s.adapter == "default"} == {8.0}  # alpha=64, r=8


# --- fuzz: random configs and layouts give a SurgeryError or a working model ------------------------------------

FIELDS = ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "use_dora",
          "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules", "init_lora_weights", "parts",
          "methods", "alpha", "token_indices", "feedforward_modules", "oft_block_size", "use_rslora", "lora_bias"]
TYPES = ["LORA", "LOHA", "LOKR", "IA3", "OFT", "VERA", "TRAINABLE_TOKENS", "SURGEON_MIXTURE", "lora", ""]
TEXT = st.sampled_from(["q_proj", "v_proj", "model.layers.0.self_attn.q_proj", ".*", "all-linear", "layers", 'a"b', "x\ny", "",
                        "mixture/lora", "../A"]) | st.text(max_size=8)
SCALAR = st.none() | st.booleans() | st.integers(-3, 70) | st.floats(-1e3, 1e3, allow_nan=False) | TEXT
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
RANDOM = st.fixed_dictionaries({"peft_type": st.sampled_from(TYPES) | JSON}, optional={f: JSON for f in FIELDS if f != "peft_type"})
# near a real config (mostly loadable): random values of the fields that change only scales and dropouts
PLAUSIBLE = st.fixed_dictionaries({"peft_type": st.just("LORA")}, optional={
    "lora_alpha": st.integers(1, 64) | st.floats(0.5, 64), "use_rslora": st.booleans(), "lora_dropout": st.floats(0, 0.9),
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "v_proj"]), st.integers(1, 8), max_size=1),
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", r"model\.layers\.0\.self_attn\.v_proj"]), st.integers(1, 64), max_size=1),
})
CONFIG = RANDOM | PLAUSIBLE
LAYOUT = st.sets(st.sampled_from(["no_weights", "empty_weights", "empty_config", "extra_subfolder", "linked_weights",
                                  "mixture_part", "no_config"]))


@pytest.fixture(scope="module")
def fuzzed(saved, tmp_path_factory):
    # eval: a loaded dropout must not make two forwards differ
    return surgeon.compile("demo:llama", RULES).eval(), saved, tmp_path_factory.mktemp("fuzz")


def _layout(saved, folder, config, layout):
    shutil.copytree(saved, folder)
    base = json.loads((saved / "adapter_config.json").read_text())
    # a LORA config keeps the saved fields it does not draw (so that some loads succeed); other types stand alone
    merged = dict(base, **config) if config.get("peft_type") == "LORA" else config
    (folder / "adapter_config.json").write_text(json.dumps(merged))
    if "no_weights" in layout:
        os.unlink(folder / "adapter_model.safetensors")
    if "empty_weights" in layout:
        (folder / "adapter_model.safetensors").write_bytes(b"")
    if "empty_config" in layout:
        (folder / "adapter_config.json").write_text("")
    if "no_config" in layout:
        os.unlink(folder / "adapter_config.json")
    if "extra_subfolder" in layout:
        shutil.copytree(saved, folder / "extra")
        (folder / "extra" / "adapter_config.json").write_text(json.dumps(merged))
    if "linked_weights" in layout and (folder / "adapter_model.safetensors").exists():
        os.unlink(folder / "adapter_model.safetensors")
        os.symlink(saved / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    if "mixture_part" in layout:
        shutil.copytree(saved, folder / "mixture" / "lora")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=CONFIG, layout=LAYOUT)
def test_random_folders_give_a_surgery_error_or_a_working_model(fuzzed, config, layout):
    compiled, saved, root = fuzzed
    folder = root / f"f{len(os.listdir(root))}"
    _layout(saved, folder, config, layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rules_from_peft_folder(folder)
        except SurgeryError:
            pass
        before = _state(compiled)
        try:
            compiled.load_adapter(folder, name=None if "extra_subfolder" in layout else "fuzz")
        except SurgeryError:
            _assert_same(compiled, before)  # a failure changed nothing
            event("refused")
            return
    event("loaded")
    with torch.no_grad():
        assert torch.isfinite(compiled(**compiled.example_kwargs).logits).all()
