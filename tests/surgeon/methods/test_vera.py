"""VeRA against PEFT's VERA: the shared projections, logits, gradients, files both ways, fold and unfold."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import VeraConfig as PeftVeraConfig
from peft import get_peft_model

from surgeon.capture.demos import build_demo
from surgeon.grammar import SurgeryError, parse
from surgeon.methods.vera import VeraConfig
from surgeon.methods.vera.peft import VeraPeft
from surgeon.methods.vera.site import SHARED_KEYS, VeraWeights

from .._peft_reference import inputs
from ._checks import (
    check_diagnostic_codes,
    CompiledCases,
    check_files_both_ways_fold_and_unfold,
    check_logits_and_gradients,
    check_starts_at_the_base,
    check_training_draws_match,
    copy_into_peft,
    randomize_all,
)

# Sites of different shapes, so that A (r, max in) and B (max out, r) are sliced differently per site.
CASES = {
    "llama": (
        "llama",
        'match "*.self_attn.{q,v}_proj", "*.mlp.down_proj" apply vera(r=4, projection_prng_key=3, dropout=0.1)\nmatch "*.layers.3.*" skip',
        dict(r=4, projection_prng_key=3, vera_dropout=0.1, target_modules=r".*layers\.[012]\.(self_attn\.(q|v)_proj|mlp\.down_proj)"),
    ),
    "gpt2": (
        "gpt2",
        'match "*.attn.c_attn", "*.mlp.c_proj" apply vera(r=8, d_initial=0.05, save_projection=false)',
        dict(r=8, d_initial=0.05, save_projection=False, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True),
    ),
    "bert": (
        "bert",
        'match "*.attention.self.query", "*.intermediate.dense" apply vera(r=2)',
        dict(r=2, target_modules=["query", "intermediate.dense"]),
    ),
}


@pytest.fixture(scope="module")
def compiled_vera():
    return CompiledCases(CASES)


def _peft(demo: str, peft_kwargs: dict):
    with warnings.catch_warnings():  # PEFT warns that save_projection=False draws A and B again on loading
        warnings.simplefilter("ignore", UserWarning)
        return get_peft_model(build_demo(demo), PeftVeraConfig(**peft_kwargs)).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_vera_has_pefts_projections_starts_at_the_base_and_matches_peft_logits_and_gradients(compiled_vera, case):
    demo, _, peft_kwargs = CASES[case]
    compiled = compiled_vera(case)
    check_starts_at_the_base(compiled, demo)  # b = 0
    reference = _peft(demo, peft_kwargs)
    modules = dict(reference.named_modules())
    sites = [m for _, _, m in compiled.sites()]
    # The very same A and B (drawn from the same seed), and every site a view of that one pair.
    shared = sites[0]._projections
    assert torch.equal(shared.a, reference.base_model.vera_A["default"])
    assert torch.equal(shared.b, reference.base_model.vera_B["default"])
    for _, path, module in compiled.sites():
        layer = modules[f"base_model.model.{path}"]
        assert module._projections is shared and module.vera_A.untyped_storage().data_ptr() == shared.a.untyped_storage().data_ptr()
        assert torch.equal(module.vera_lambda_d, layer.vera_lambda_d["default"])  # d_initial
        assert torch.equal(module.vera_lambda_b, layer.vera_lambda_b["default"])  # zeros
    assert compiled.plan.adapter_params == reference.get_nb_trainable_parameters()[0]
    randomize_all(compiled, seed=1)  # the vectors (A and B are buffers, so they stay as drawn)
    check_logits_and_gradients(compiled, copy_into_peft(compiled, reference), demo)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_vera_files_both_ways_fold_and_unfold(compiled_vera, case, tmp_path):
    demo = CASES[case][0]
    compiled = compiled_vera(case)
    randomize_all(compiled, seed=5)
    sites = [m for _, _, m in compiled.sites()]
    saved = VeraWeights.peft_shared_state(sites)
    drawn = {k: v.clone() for k, v in saved.items()}
    if case == "llama":
        assert list(saved) == list(SHARED_KEYS)
        with torch.no_grad():  # projections unlike the seed's: what is saved and loaded must be these
            for tensor in saved.values():
                tensor.mul_(1.5)
    else:
        assert saved == {}  # save_projection=false: drawn again from the seed on loading, as PEFT does
    try:
        check_files_both_ways_fold_and_unfold(compiled, demo, "vera", tmp_path)
    finally:
        with torch.no_grad():  # the seed's projections again, for the other tests of this case
            for key, tensor in saved.items():
                tensor.copy_(drawn[key])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in keys - set(SHARED_KEYS))
    assert (set(SHARED_KEYS) <= keys) == (case == "llama")


def test_vera_training_dropout_draws_as_peft(compiled_vera):
    demo, _, peft_kwargs = CASES["llama"]
    compiled = compiled_vera("llama")
    randomize_all(compiled, seed=2)
    check_training_draws_match(compiled, copy_into_peft(compiled, _peft(demo, peft_kwargs)), demo)


def test_vera_attach_gives_the_eager_model_the_graphs_logits(compiled_vera):
    compiled = compiled_vera("gpt2")  # Conv1D sites of different shapes
    randomize_all(compiled, seed=7)
    handles = compiled.attach()
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled.base_model(**inputs()).logits, compiled(**inputs()).logits, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


def test_vera_projections_stay_shared_through_conversions(compiled_vera):
    compiled = compiled_vera("bert")
    sites = [m for _, _, m in compiled.sites()]
    before = sites[0]._projections.a.clone()
    compiled.double()
    try:
        shared = sites[0]._projections
        assert shared.a.dtype == torch.float64 and torch.equal(shared.a, before.double())
        assert shared.applied is None  # every site saw the conversion: it is done
        for module in sites:
            assert module.vera_A.dtype == torch.float64
            assert module.vera_A.untyped_storage().data_ptr() == shared.a.untyped_storage().data_ptr()
            assert module.vera_B.untyped_storage().data_ptr() == shared.b.untyped_storage().data_ptr()
    finally:
        compiled.float()


def _site(path, config, in_features, out_features):
    return SimpleNamespace(path=path, adapter="default", config=config, kind="linear", in_features=in_features, out_features=out_features)


def test_vera_sites_of_one_adapter_must_agree_and_share_the_largest_shapes():
    config = VeraConfig(r=3)
    peers = (_site("a", config, 5, 7), _site("b", config, 9, 2))
    first = VeraWeights(config, "linear", 5, 7, peers=peers)
    second = VeraWeights(config, "linear", 9, 2, peers=peers)
    assert first._projections is second._projections
    assert first._projections.a.shape == (3, 9) and first._projections.b.shape == (7, 3)
    assert first.vera_A.shape == (3, 5) and second.vera_B.shape == (2, 3)
    assert first.vera_lambda_b.shape == (7,) and torch.all(first.vera_lambda_d == 0.1)
    assert config.trainable_params(5, 7) == 3 + 7
    other = (_site("a", config, 5, 7), _site("b", VeraConfig(r=3, projection_prng_key=1), 9, 2))
    with pytest.raises(SurgeryError, match="different arguments"):
        VeraWeights(config, "linear", 5, 7, peers=other)


def test_vera_reads_pefts_config():
    base = {"peft_type": "VERA", "r": 16, "target_modules": ["q_proj", "v_proj"]}
    # rules_from_peft builds rule objects (never text): compared as they print
    assert list(map(str, VeraPeft.rules_from_peft(base))) == ['match "{q_proj,v_proj}", "*.{q_proj,v_proj}" apply vera(r=16)']
    full = dict(base, d_initial=0.2, projection_prng_key=7, vera_dropout=0.1, save_projection=False, layers_to_transform=[0, 2])
    (line,) = map(str, VeraPeft.rules_from_peft(full))
    assert line.endswith("where layer in [0, 2] apply vera(r=16, d_initial=0.2, projection_prng_key=7, dropout=0.1, save_projection=false)")
    assert parse(line).rules[0].action.method.config == VeraConfig(r=16, d_initial=0.2, projection_prng_key=7, dropout=0.1, save_projection=False)
    with pytest.raises(SurgeryError, match="bias"):
        VeraPeft.rules_from_peft(dict(base, bias="vera_only"))


def test_every_vera_argument_is_checked_by_the_language():
    check_diagnostic_codes(
        (
            ('match "x" apply vera(r=0)', "out-of-range"),
            ('match "x" apply vera(d_initial=0.1)', "missing-argument"),
            ('match "x" apply vera(r=4, dropout=1)', "out-of-range"),
            ('match "x" apply vera(r=4, projection_prng_key=0.5)', "bad-type"),
            ('match "x" apply vera(r=4, projection_prng_key=-9223372036854775809)', "out-of-range"),
            ('match "x" apply vera(r=4, save_projection=1)', "bad-type"),
            ('match "x" apply vera(r=4, alpha=8)', "unknown-argument"),
        )
    )
