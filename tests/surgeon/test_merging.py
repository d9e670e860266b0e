"""surgeon.compiled.merge_math against PEFT 0.21's add_weighted_adapter, hand-checked cases, and argument errors."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel

from surgeon.compiled.merge_math import COMBINATIONS, check_merge_args, low_rank_delta, merge_low_rank_site

# Three adapters with different scales: x r=4 s=8/4=2, y r=6 s=3/6=0.5, z r=4 rsLoRA s=4/sqrt(4)=2.
# The merged config is copied from the first adapter, so x (not rsLoRA) always comes first.
ADAPTERS = {
    "x": {"r": 4, "lora_alpha": 8},
    "y": {"r": 6, "lora_alpha": 3},
    "z": {"r": 4, "lora_alpha": 4, "use_rslora": True},
}
SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
FACTORWISE_TYPES = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 10)
        self.b = torch.nn.Linear(10, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def peft_model(names):
    """A PEFT model on Tiny with the named adapters, all with random non-zero A and B."""
    torch.manual_seed(0)
    model = None
    for name in names:
        config = LoraConfig(target_modules=["a", "b"], **ADAPTERS[name])
        if model is None:
            model = get_peft_model(Tiny(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in names:
                    for w in (module.lora_A[name].weight, module.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=generator) * 0.5)
    return model


def sites(model):
    """The LoRA layers in module order (PEFT's merge loop order)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]


def factors_of(layer, names):
    return [(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach(), layer.scaling[n]) for n in names]


@pytest.fixture
def quiet_inject(monkeypatch):
    """PEFT draws the new adapter's initial weights before its merge loop; keep those draws off the global RNG,
    so that after torch.manual_seed(s) PEFT's dare masks are the first draws, as in surgeon's site-by-site loop."""
    inject = LoraModel.inject_adapter

    def forked(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return inject(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "inject_adapter", forked)


def run_both(names, weights, combination, seed=123, **kwargs):
    """PEFT's merge and surgeon's, from the same seed; yields (path, layer, (A, B, s)) per site."""
    model = peft_model(names)
    peft_kwargs = dict(kwargs)
    if "majority_sign" in peft_kwargs:
        peft_kwargs["majority_sign_method"] = peft_kwargs.pop("majority_sign")
    torch.manual_seed(seed)
    model.add_weighted_adapter(names, weights, "m", combination_type=combination, **peft_kwargs)
    torch.manual_seed(seed)
    merged = [(p, m, merge_low_rank_site(factors_of(m, names), weights, combination, **kwargs)) for p, m in sites(model)]
    return model, merged


# ----------------------------------------------------------------------------------------------- against PEFT

PEFT_CASES = [
    ("cat", ["x", "y", "z"], [0.7, -0.4, 0.5], {}),
    ("svd", ["x", "y", "z"], [0.7, -0.4, 0.5], {}),
    ("svd", ["x", "y"], [0.7, 0.3], {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", ["x", "z"], [0.7, -0.3], {"density": 0.5}),
    ("ties", ["x", "z"], [0.7, 0.3], {"density": 0.5, "majority_sign": "frequency"}),
    ("ties_svd", ["x", "y", "z"], [0.7, 0.3, 0.5], {"density": 0.5}),
    ("ties_svd", ["x", "y"], [0.7, -0.3], {"density": 0.5, "majority_sign": "frequency", "svd_rank": 5}),
    ("dare_linear", ["x", "z"], [0.7, 0.3], {"density": 0.5}),
    ("dare_linear_svd", ["x", "y", "z"], [0.7, 0.3, -0.5], {"density": 0.5}),
    ("dare_ties", ["x", "z"], [0.7, -0.3], {"density": 0.5}),
    ("dare_ties", ["x", "z"], [0.7, 0.3], {"density": 0.6, "majority_sign": "frequency"}),
    ("dare_ties_svd", ["x", "y"], [0.7, 0.3], {"density": 0.5, "svd_clamp": 0.95}),
    ("magnitude_prune", ["x", "z"], [0.7, 0.3], {"density": 0.5}),
    ("magnitude_prune", ["x", "z"], [0.7, 0.3], {"density": 1.0}),
    ("magnitude_prune_svd", ["x", "y", "z"], [0.7, -0.3, 0.5], {"density": 0.5}),
]


@pytest.mark.filterwarnings("ignore:The density 1.0")
@pytest.mark.parametrize("combination,names,weights,kwargs", PEFT_CASES, ids=lambda v: str(v))
def test_matches_peft(combination, names, weights, kwargs, quiet_inject):
    model, merged = run_both(names, weights, combination, **kwargs)
    config = model.peft_config["m"]
    for path, layer, (A, B, scale) in merged:
        assert scale == 1.0 and layer.scaling["m"] == 1.0, path  # alpha = r: the scale is folded in
        peft_A, peft_B = layer.lora_A["m"].weight, layer.lora_B["m"].weight
        # PEFT sizes every site at the config's rank; here every site has it.
        assert A.shape == peft_A.shape and B.shape == peft_B.shape and A.shape[0] == config.r, path
        # The same float ops in the same order: bitwise equal on CPU (torch 2.13); 1e-6 leaves room for other builds.
        torch.testing.assert_close(A, peft_A, rtol=0, atol=1e-6)
        torch.testing.assert_close(B, peft_B, rtol=0, atol=1e-6)
        torch.testing.assert_close(low_rank_delta(A, B, scale), layer.get_delta_weight("m"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("combination", FACTORWISE_TYPES + SVD_TYPES + ["cat", "linear"])
def test_single_adapter_is_linear_as_peft(combination, quiet_inject):
    """PEFT merges one adapter with linear whatever the type; so does surgeon (and that merge is exact)."""
    kwargs = {"density": 0.5} if "density" in COMBINATIONS[combination].params else {}
    _, merged = run_both(["y"], [0.6], combination, **kwargs)
    for path, layer, (A, B, _) in merged:
        torch.testing.assert_close(A, layer.lora_A["m"].weight, rtol=0, atol=0)
        torch.testing.assert_close(B, layer.lora_B["m"].weight, rtol=0, atol=0)
        torch.testing.assert_close(low_rank_delta(A, B), 0.6 * layer.get_delta_weight("y"), rtol=0, atol=1e-6)


def test_dare_draw_order_matters():
    """The seeded match above is not vacuous: another seed gives other masks, hence another merge."""
    factors = factors_of(sites(peft_model(["x", "z"]))[0][1], ["x", "z"])
    torch.manual_seed(0)
    first = merge_low_rank_site(factors, [0.7, 0.3], "dare_ties", density=0.5)
    torch.manual_seed(1)
    second = merge_low_rank_site(factors, [0.7, 0.3], "dare_ties", density=0.5)
    assert not torch.equal(first[0], second[0])


# ----------------------------------------------------------------------------------------------- linear


def test_linear_is_the_exact_weighted_sum():
    names, weights = ["x", "y", "z"], [0.7, -0.4, 0.5]  # different ranks are fine: rank 4 + 6 + 4
    for _, layer in sites(peft_model(names)):
        factors = factors_of(layer, names)
        exact = sum(w * s * (B.double() @ A.double()) for (A, B, s), w in zip(factors, weights))
        A, B, scale = merge_low_rank_site(factors, weights, "linear")
        assert scale == 1.0 and A.shape[0] == B.shape[1] == 14
        torch.testing.assert_close(low_rank_delta(A, B, scale).double(), exact, rtol=0, atol=1e-5)
        A64, B64, _ = merge_low_rank_site([(A.double(), B.double(), s) for A, B, s in factors], weights, "linear")
        torch.testing.assert_close(B64 @ A64, exact, rtol=0, atol=1e-12)


def test_peft_linear_has_cross_terms():
    """Why surgeon's linear is not PEFT's (PEFT issue #3004): PEFT returns (sum_i b_i B_i)(sum_j a_j A_j), with
    a_i = sign(c_i) sqrt|c_i|, b_i = sqrt|c_i|, c_i = w_i s_i; the i != j terms belong to no adapter."""
    names, weights = ["x", "z"], [0.7, 0.3]
    model = peft_model(names)
    model.add_weighted_adapter(names, weights, "m", combination_type="linear")
    for path, layer in sites(model):
        (A1, B1, s1), (A2, B2, s2) = [(A.double(), B.double(), s) for A, B, s in factors_of(layer, names)]
        c1, c2 = weights[0] * s1, weights[1] * s2
        exact = c1 * B1 @ A1 + c2 * B2 @ A2
        cross = (c1 * c2) ** 0.5 * (B1 @ A2 + B2 @ A1)
        peft_delta = layer.get_delta_weight("m").double()
        torch.testing.assert_close(peft_delta, exact + cross, rtol=0, atol=1e-5)
        assert (peft_delta - exact).abs().max() > 0.1, path
        A, B, _ = merge_low_rank_site(factors_of(layer, names), weights, "linear")
        torch.testing.assert_close((B @ A).double(), exact, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- by hand

# Two 2x2 updates, as (A = I, B = M_i, s = 1), so dW_i = M_i; weights 0.5 and 0.25; density 0.75 keeps
# int(0.75 * 4) = 3 entries of largest |value|:
#   M1 = [[3, -1], [0.5, 2]]   -> P1 = [[3, -1], [0, 2]]   (0.5 dropped)
#   M2 = [[2, 4], [0.25, -3]]  -> P2 = [[2, 4], [0, -3]]   (0.25 dropped)
# magnitude_prune: 0.5 P1 + 0.25 P2 = [[1.5 + 0.5, -0.5 + 1], [0, 1 - 0.75]] = [[2, 0.5], [0, 0.25]].
# ties, "total": elected sign of P1 + P2 = [[5, 3], [0, -1]] is [[+, +], [+, -]] (0 counts as +). Agreeing
#   entries: (0,0) both -> (1.5 + 0.5) / 2 = 1; (0,1) only P2 -> 1 / 1 = 1; (1,0) none (zeros have sign 0) -> 0;
#   (1,1) only P2 (-3 < 0) -> -0.75 / 1.  D = [[1, 1], [0, -0.75]].
# ties, "frequency": sign(P1) + sign(P2) = [[2, 0], [0, 0]] -> all +: (1,1) is now P1's alone -> 0.5 * 2 = 1.
#   D = [[1, 1], [0, 1]].  The sign is elected on the unweighted pruned tensors.
M1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
M2 = torch.tensor([[2.0, 4.0], [0.25, -3.0]])
HAND = [
    ("magnitude_prune_svd", "total", [[2.0, 0.5], [0.0, 0.25]]),
    ("ties_svd", "total", [[1.0, 1.0], [0.0, -0.75]]),
    ("ties_svd", "frequency", [[1.0, 1.0], [0.0, 1.0]]),
]


@pytest.mark.parametrize("combination,sign,expected", HAND)
def test_hand_checked_task_merges(combination, sign, expected):
    factors = [(torch.eye(2), M1, 1.0), (torch.eye(2), M2, 1.0)]
    A, B, scale = merge_low_rank_site(factors, [0.5, 0.25], combination, density=0.75, majority_sign=sign, svd_rank=2)
    torch.testing.assert_close(low_rank_delta(A, B, scale), torch.tensor(expected), rtol=0, atol=1e-6)


def test_hand_checked_factorwise_magnitude_prune():
    # Rank 1: A_i (1, 2), B_i (2, 1), s_i = 1, weights 4 and 1 -> a = b = (2, 1). density 0.5 keeps 1 of 2 entries:
    # P(A1) = [3, 0], P(A2) = [0, -2] -> A = 2 [3, 0] + 1 [0, -2] = [6, -2];
    # P(B1) = [0, 1]^T, P(B2) = [5, 0]^T -> B = 2 [0, 1] + 1 [5, 0] = [5, 2]^T.
    factors = [
        (torch.tensor([[3.0, 1.0]]), torch.tensor([[0.5], [1.0]]), 1.0),
        (torch.tensor([[1.0, -2.0]]), torch.tensor([[5.0], [0.0]]), 1.0),
    ]
    A, B, _ = merge_low_rank_site(factors, [4.0, 1.0], "magnitude_prune", density=0.5)
    torch.testing.assert_close(A, torch.tensor([[6.0, -2.0]]))
    torch.testing.assert_close(B, torch.tensor([[5.0], [2.0]]))


def test_svd_rank_above_the_matrix_rank_pads_with_zeros():
    factors = [(torch.eye(2), M1, 1.0), (torch.eye(2), M2, 1.0)]
    A, B, _ = merge_low_rank_site(factors, [0.5, 0.25], "svd", svd_rank=5)
    assert A.shape == (5, 2) and B.shape == (2, 5) and not A[2:].any() and not B[:, 2:].any()
    torch.testing.assert_close(B @ A, 0.5 * M1 + 0.25 * M2)


# ----------------------------------------------------------------------------------------------- errors


def test_registry_lists_types_and_arguments():
    assert set(COMBINATIONS) == {"linear", "cat", "svd", *FACTORWISE_TYPES, *(t + "_svd" for t in FACTORWISE_TYPES)}
    assert COMBINATIONS["ties"].params == {"density", "majority_sign"}
    assert COMBINATIONS["dare_linear_svd"].params == {"density", "svd_rank", "svd_clamp"}
    assert COMBINATIONS["linear"].params == set() and COMBINATIONS["cat"].params == set()
    assert COMBINATIONS["ties"].equal_ranks and not COMBINATIONS["ties_svd"].equal_ranks
    assert check_merge_args("svd", svd_rank=3) is COMBINATIONS["svd"]


R4 = (torch.ones(4, 12), torch.ones(10, 4), 1.0)
R6 = (torch.ones(6, 12), torch.ones(10, 6), 1.0)
ERRORS = [
    ({"combination": "average"}, "unknown combination type 'average'"),
    ({"combination": "ties"}, "needs a density"),
    ({"combination": "ties", "density": 0.0}, r"density must be a number in \(0, 1\]"),
    ({"combination": "dare_linear", "density": 1.5}, r"density must be a number in \(0, 1\]"),
    ({"combination": "linear", "density": 0.5}, "'linear' does not take density"),
    ({"combination": "cat", "svd_rank": 2}, "'cat' does not take svd_rank"),
    ({"combination": "magnitude_prune", "density": 0.5, "majority_sign": "frequency"}, "does not take majority_sign"),
    ({"combination": "ties", "density": 0.5, "majority_sign": "mean"}, "majority_sign must be 'total' or 'frequency'"),
    ({"combination": "svd", "svd_rank": 0}, "svd_rank must be a positive integer"),
    ({"combination": "svd", "svd_clamp": 1.5}, r"svd_clamp must be a quantile in \(0, 1\]"),
    ({"combination": "ties", "density": 0.5, "factors": [R4, R6]}, "needs equal ranks, got \\[4, 6\\]"),
    ({"combination": "cat", "weights": [1.0]}, "got 2 adapters but 1 weights"),
    ({"combination": "cat", "weights": [1.0, float("nan")]}, "weights must be finite numbers"),
    ({"combination": "cat", "factors": []}, "factors is empty"),
    ({"combination": "cat", "factors": [R4, (torch.ones(4, 12), torch.ones(9, 4), 1.0)]}, "same \\(out, in\\)"),
    ({"combination": "cat", "factors": [R4, (torch.ones(4, 12), torch.ones(10, 3), 1.0)]}, "A has rank 4 but B"),
    ({"combination": "cat", "factors": [R4, (torch.ones(4), torch.ones(10, 4), 1.0)]}, "must be 2-D tensors"),
    ({"combination": "cat", "factors": [R4, (torch.ones(4, 12), torch.ones(10, 4))]}, r"tuple \(A, B, scale\)"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_arguments_raise_value_error(kwargs, message):
    kwargs = {"factors": [R4, R4], "weights": [0.5, 0.5], **kwargs}
    with pytest.raises(ValueError, match=message):
        merge_low_rank_site(kwargs.pop("factors"), kwargs.pop("weights"), kwargs.pop("combination"), **kwargs)
