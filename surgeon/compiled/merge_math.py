"""Weighted merging of adapters: the math of PEFT's ``add_weighted_adapter``, as pure tensor functions.

One *site* (one adapted linear map, weight (out, in)) carries one low-rank update (a LoRA) per
source adapter i: ``A_i`` (r_i, in), ``B_i`` (out, r_i) and its scale
``s_i`` (alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA), so that its
update is ``dW_i = s_i B_i A_i``. Given user weights ``w_i`` (any sign),
:func:`merge_low_rank_site` returns one LoRA ``(A, B, s)`` whose update is
``s B A``. The scaling is always folded into the factors and ``s = 1.0``, as
PEFT does by giving the merged adapter ``lora_alpha = r``.

Notation: ``c_i = w_i s_i``, ``a_i = sign(c_i) sqrt|c_i|`` (weight on A) and
``b_i = sqrt|c_i|`` (weight on B), so ``a_i b_i = c_i``. ``d`` is the density.

Combination types (rank of the merged adapter in brackets):

* ``linear`` [sum r_i] -- exact: ``A = [a_1 A_1; ...; a_n A_n]`` (rows
  stacked), ``B = [b_1 B_1, ..., b_n B_n]`` (columns), hence
  ``B A = sum_i a_i b_i B_i A_i = sum_i w_i s_i B_i A_i``. This deliberately
  differs from PEFT 0.21's ``linear`` (PEFT issue #3004), which returns
  ``(sum_i b_i B_i)(sum_j a_j A_j)``: equal ranks only, and cross terms
  ``b_i a_j B_i A_j`` (i != j) that belong to no adapter. With one adapter
  both are the same tensors.
* ``cat`` [sum r_i] -- exact, as PEFT: ``A = [c_1 A_1; ...]``, ``B = [B_1, ...]``.
* ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` [r, equal
  ranks required] -- as PEFT, the task merge T below is applied to the A's and
  to the B's separately: ``A = T({A_i}, {a_i})``, ``B = T({B_i}, {b_i})``. Like
  PEFT's linear this is not ``sum_i w_i dW_i``; it is PEFT's method, kept as is.
* ``svd`` / ``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd`` /
  ``magnitude_prune_svd`` [k = svd_rank or max r_i] -- as PEFT: ``D = T({dW_i},
  {w_i})`` (T = weighted sum for ``svd``), ``D = U S V^T`` (full SVD),
  ``B = U_k S_k``, ``A = V_k^T``; with ``svd_clamp = q``, h = the q-quantile of
  the entries of A and B together, both are clamped to [-h, h]. If k exceeds
  min(out, in), the factors are zero-padded to rank k (PEFT fails there).

Task merges T of tensors ``t_i`` with weights ``v_i`` (PEFT's merge_utils):

* weighted sum: ``sum_i v_i t_i``.
* magnitude_prune: ``sum_i v_i P(t_i)``, where P keeps the ``int(d * numel)``
  entries of largest |value| (ties broken by ``torch.topk``) and zeroes the rest.
* ties: ``t'_i = P(t_i)``; elected sign ``e = sign(sum_i t'_i)`` ("total") or
  ``sign(sum_i sign t'_i)`` ("frequency"), with e = +1 where that sum is 0;
  ``m_i = [sign t'_i == e]``; result ``sum_i m_i v_i t'_i / max(1, sum_i m_i)``
  entrywise. Note the sign is elected on the unweighted pruned tensors.
* dare_linear: ``t'_i = t_i * Bernoulli(d) / d``, then the weighted sum.
* dare_ties: the same t'_i, then the sign election and disjoint mean of ties.
* With d = 1 nothing is pruned (and dare draws no random numbers).

dare's draws come from the global torch RNG, ``torch.bernoulli`` once per
tensor, in PEFT's order: for the factor-wise types A_1..A_n then B_1..B_n; for
the svd types dW_1..dW_n. Calling :func:`merge_low_rank_site` site after site, in
the model's module order, from the same seed as PEFT's merge loop reproduces
PEFT's masks (PEFT first draws initial weights for the new adapter; see the
tests for how to line the two up).

As in PEFT, a single source adapter is always merged with ``linear``, whatever
the type asked (the arguments are still checked against the type asked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real

import torch

__all__ = [
    "COMBINATIONS",
    "MAJORITY_SIGN_METHODS",
    "Combination",
    "check_merge_args",
    "low_rank_delta",
    "merge_low_rank_site",
]

MAJORITY_SIGN_METHODS = ("total", "frequency")

Factors = Sequence[tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class Combination:
    """One combination type: its extra arguments, whether it needs equal ranks, the rank of its result."""

    name: str
    params: frozenset[str]  # among "density", "majority_sign", "svd_rank", "svd_clamp"
    equal_ranks: bool
    rank: str  # the merged adapter's rank, in words
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = field(repr=False, compare=False)  # -> (A, B)


COMBINATIONS: dict[str, Combination] = {}


def _combination(name: str, params: Sequence[str] = (), *, equal_ranks: bool = False, rank: str):
    def register(fn):
        COMBINATIONS[name] = Combination(name, frozenset(params), equal_ranks, rank, fn)
        return fn

    return register


# --------------------------------------------------------------------------- task merges (PEFT's merge_utils math)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-|value| entries of t."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    keep = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices
    mask[keep] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability density, rescaled by 1 / density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor, _opts) -> torch.Tensor:
    return _weighted(stacked, weights).sum(dim=0)


def _disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, opts) -> torch.Tensor:
    """TIES' sign election (on the unweighted tensors) and mean over the agreeing entries."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if opts["majority_sign"] == "total" else sign.sum(dim=0)
    agree = sign == torch.where(votes >= 0, 1, -1)
    total = (_weighted(stacked, weights) * agree).sum(dim=0)
    return total / torch.clamp(agree.sum(dim=0), min=1.0)


# name -> (prune or None, reduce)
_TASK_MERGES = {
    "sum": (None, _weighted_sum),
    "ties": (_prune_magnitude, _disjoint_mean),
    "dare_linear": (_prune_random, _weighted_sum),
    "dare_ties": (_prune_random, _disjoint_mean),
    "magnitude_prune": (_prune_magnitude, _weighted_sum),
}


def _task_merge(kind: str, tensors: list[torch.Tensor], weights: list[float], opts) -> torch.Tensor:
    prune, reduce = _TASK_MERGES[kind]
    if prune is not None:
        tensors = [prune(t, opts["density"]) for t in tensors]
    w = torch.tensor(weights).to(tensors[0].device)  # float32, as PEFT
    return reduce(torch.stack(tensors, dim=0), w, opts)


def _ab_weights(factors, weights) -> tuple[list[float], list[float]]:
    """a_i = sign(c_i) sqrt|c_i| (on A) and b_i = sqrt|c_i| (on B), c_i = w_i s_i."""
    wa, wb = [], []
    for (_, _, scale), w in zip(factors, weights):
        c = w * scale
        root = math.sqrt(abs(c))
        wa.append(root if c >= 0 else -root)
        wb.append(root)
    return wa, wb


# --------------------------------------------------------------------------- combination types


@_combination("linear", rank="sum of the ranks")
def _linear(factors, weights, _opts):
    """Exact: A = [a_i A_i] stacked by rows, B = [b_i B_i] by columns; B A = sum_i w_i s_i B_i A_i."""
    wa, wb = _ab_weights(factors, weights)
    a = torch.cat([A * torch.tensor(x, dtype=A.dtype) for (A, _, _), x in zip(factors, wa)], dim=0)
    b = torch.cat([B * torch.tensor(x, dtype=B.dtype) for (_, B, _), x in zip(factors, wb)], dim=1)
    return a, b


@_combination("cat", rank="sum of the ranks")
def _cat(factors, weights, _opts):
    """PEFT's cat (exact): A = [w_i s_i A_i] stacked by rows, B = [B_i] by columns."""
    a = torch.cat([A * w * scale for (A, _, scale), w in zip(factors, weights)], dim=0)
    b = torch.cat([B for _, B, _ in factors], dim=1)
    return a, b


def _factorwise(kind: str):
    """PEFT's factor-wise merge: A = T({A_i}, {a_i}), B = T({B_i}, {b_i}) (A's first: dare's draw order)."""

    def merge(factors, weights, opts):
        wa, wb = _ab_weights(factors, weights)
        a = _task_merge(kind, [A for A, _, _ in factors], wa, opts)
        b = _task_merge(kind, [B for _, B, _ in factors], wb, opts)
        return a, b

    return merge


def _svd(kind: str):
    """PEFT's svd merge: D = T({s_i B_i A_i}, {w_i}), truncated to rank k by a full SVD (and clamped)."""

    def merge(factors, weights, opts):
        deltas = [low_rank_delta(A, B, scale) for A, B, scale in factors]
        delta = _task_merge(kind, deltas, list(weights), opts)
        k = opts["svd_rank"] or max(A.shape[0] for A, _, _ in factors)
        kept = min(k, *delta.shape)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        u = u[:, :kept] @ torch.diag(s[:kept])
        vh = vh[:kept, :]
        if opts["svd_clamp"] is not None:
            hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), opts["svd_clamp"])
            u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
        if kept < k:  # rank asked above min(out, in): pad with zeros, the update is unchanged
            u = torch.nn.functional.pad(u, (0, k - kept))
            vh = torch.nn.functional.pad(vh, (0, 0, 0, k - kept))
        return vh, u

    return merge


_SVD_PARAMS = ("svd_rank", "svd_clamp")
_combination("svd", _SVD_PARAMS, rank="svd_rank, else the largest rank")(_svd("sum"))
for _kind, _params in [
    ("ties", ("density", "majority_sign")),
    ("dare_linear", ("density",)),
    ("dare_ties", ("density", "majority_sign")),
    ("magnitude_prune", ("density",)),
]:
    _combination(_kind, _params, equal_ranks=True, rank="the common rank")(_factorwise(_kind))
    _combination(f"{_kind}_svd", _params + _SVD_PARAMS, rank="svd_rank, else the largest rank")(_svd(_kind))
del _kind, _params


# --------------------------------------------------------------------------- public API


def low_rank_delta(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The update of one low-rank adapter, s * (B @ A), of shape (out, in) (computed in PEFT's order)."""
    return (B @ A) * scale


def check_merge_args(
    combination: str,
    *,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
) -> Combination:
    """Check a combination type and its extra arguments (no tensors needed); return its :class:`Combination`.

    Raises ``ValueError``: unknown type; an argument the type does not take
    (``majority_sign`` counts as given when it is not "total"); ``density``
    missing where needed or outside (0, 1]; ``majority_sign`` not in
    ("total", "frequency"); ``svd_rank`` not a positive int; ``svd_clamp``
    outside (0, 1].
    """
    spec = COMBINATIONS.get(combination) if isinstance(combination, str) else None
    if spec is None:
        raise ValueError(f"unknown combination type {combination!r}; expected one of {', '.join(COMBINATIONS)}")
    given = {
        "density": density is not None,
        "majority_sign": majority_sign != "total",
        "svd_rank": svd_rank is not None,
        "svd_clamp": svd_clamp is not None,
    }
    extra = [name for name, is_given in given.items() if is_given and name not in spec.params]
    if extra:
        takes = ", ".join(sorted(spec.params)) or "no extra argument"
        raise ValueError(f"combination {combination!r} does not take {', '.join(extra)} (it takes: {takes})")
    if "density" in spec.params:
        if density is None:
            raise ValueError(f"combination {combination!r} needs a density in (0, 1]")
        if isinstance(density, bool) or not isinstance(density, Real) or not 0 < density <= 1:
            raise ValueError(f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}")
    if majority_sign not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, Real) or not 0 < svd_clamp <= 1
    ):
        raise ValueError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}")
    return spec


def _check_weights(weights, n: int) -> list[float]:
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"got {n} adapters but {len(weights)} weights; give one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
            raise ValueError(f"weights must be finite numbers, got {w!r}")
    return [float(w) for w in weights]


def _check_factors(factors, spec: Combination):
    factors = list(factors)
    if not factors:
        raise ValueError("nothing to merge: factors is empty")
    checked = []
    for i, item in enumerate(factors):
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise ValueError(f"factors[{i}] must be a tuple (A, B, scale)")
        A, B, scale = item
        if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.dim() == 2 and B.dim() == 2):
            raise ValueError(f"factors[{i}]: A (r, in) and B (out, r) must be 2-D tensors")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"factors[{i}]: A and B must be floating-point tensors")
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"factors[{i}]: A has rank {A.shape[0]} but B has rank {B.shape[1]}")
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
            raise ValueError(f"factors[{i}]: scale must be a finite number, got {scale!r}")
        checked.append((A, B, float(scale)))
    shapes = {(B.shape[0], A.shape[1]) for A, B, _ in checked}
    if len(shapes) > 1:
        raise ValueError(f"the adapters of one site must update the same (out, in) weight, got {sorted(shapes)}")
    ranks = [A.shape[0] for A, _, _ in checked]
    if spec.equal_ranks and len(set(ranks)) > 1:
        raise ValueError(
            f"combination {spec.name!r} merges the A's and the B's entrywise and needs equal ranks, got {ranks}; "
            "use linear, cat or an *_svd type for different ranks"
        )
    return checked


def merge_low_rank_site(
    factors: Factors,
    weights: Sequence[float],
    combination: str,
    *,
    density: float | None = None,
    majority_sign: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    single_as_linear: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Merge the LoRAs of one site into one: returns ``(A, B, scale)`` with update ``scale * B @ A``.

    ``factors``: one ``(A_i (r_i, in), B_i (out, r_i), s_i)`` per source
    adapter; ``weights``: the user's weight of each. ``scale`` is always 1.0
    (the scales are folded into A and B). See the module docstring for the math
    of each type and its rank. Low-precision factors are merged in float32 and
    returned in the dtype of the first A. dare types draw from torch's global
    RNG. Raises ``ValueError`` on bad input (see :func:`check_merge_args`).
    ``single_as_linear=False`` is for a site where one adapter of a larger
    merge is present: PEFT applies the type to it alone (ties prunes it).
    """
    spec = check_merge_args(
        combination, density=density, majority_sign=majority_sign, svd_rank=svd_rank, svd_clamp=svd_clamp
    )
    checked = _check_factors(factors, spec)
    weights = _check_weights(weights, len(checked))
    dtype = checked[0][0].dtype
    work = torch.promote_types(dtype, torch.float32)
    checked = [(A.to(work), B.to(work), s) for A, B, s in checked]
    if len(checked) == 1 and single_as_linear:  # as PEFT: a merge of one adapter is linear (and exact)
        spec = COMBINATIONS["linear"]
    opts = {"density": density, "majority_sign": majority_sign, "svd_rank": svd_rank, "svd_clamp": svd_clamp}
    with torch.no_grad():
        A, B = spec.fn(checked, weights, opts)
    return A.to(dtype), B.to(dtype), 1.0
