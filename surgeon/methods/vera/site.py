"""VeRA on a site (torch; config.py holds the config and the math).

    A: (r, max in), B: (max out, r)   frozen, one pair per adapter
    d: (r,) starts at d_initial       b: (out,) starts at zero       (trained)
    y' = y + b * linear(d * linear(dropout(x), A[:, :in]), B[:out, :])

Each site keeps ``vera_A``/``vera_B`` as buffers that are views of the
adapter's one pair (its corner of it), so the projections cost their memory
once per adapter, and loading a saved pair into it reaches every site. The
sites of one adapter find that pair through their ``peers`` (the same plan
site objects for all of them), and ``_apply`` keeps the sharing through
``.to()`` and dtype conversions.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.diagnostics import PlanError
from surgeon.grammar.rules import format_value

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter, SiteProblem
from surgeon.methods.vera.config import VeraConfig
from surgeon.methods.vera.peft import VeraPeft

__all__ = ["VeraWeights", "projections", "SHARED_KEYS"]

# PEFT saves the projections once, on its tuner ("base_model.", not under the model's "base_model.model.").
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")


def _kaiming_uniform(shape: tuple, generator) -> torch.Tensor:
    """Uniform in +-sqrt(3) * gain / sqrt(fan_in), gain sqrt(2), float32 on the CPU.

    The bound is computed in PEFT's order of operations so that it, and every draw, is the same bit for bit.
    """
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, max_in: int, max_out: int, key: int) -> tuple:
    """PEFT's (vera_A (r, max_in), vera_B (max_out, r)) for ``projection_prng_key`` ``key``: A drawn first."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return _kaiming_uniform((r, max_in), generator), _kaiming_uniform((max_out, r), generator)


class _Projections:
    """One adapter's A and B (plain tensors, not a module: each site registers views of them)."""

    def __init__(self, a, b, peers):
        self.a, self.b = a, b
        self.peers = peers  # kept alive, so that the ids keying _SHARED stay theirs
        self.users = 0  # sites viewing the pair
        self.applied, self.seen = None, 0  # the conversion under way, and how many sites it reached

    def convert(self, fn) -> None:
        """Apply ``fn`` (one ``nn.Module._apply`` conversion) to the pair once, however many sites see it."""
        if self.applied is not fn:
            self.a, self.b, self.applied, self.seen = fn(self.a), fn(self.b), fn, 0
        self.seen += 1
        if self.seen >= self.users:  # every site has it: forget fn (a later call may reuse the object)
            self.applied = None

    def __getstate__(self):
        return {**self.__dict__, "applied": None, "seen": 0}  # a conversion's closure does not pickle


# The pair of each adapter being built, by the ids of its plan sites; an entry lives as long as a site uses it.
_SHARED: "weakref.WeakValueDictionary[tuple, _Projections]" = weakref.WeakValueDictionary()


def _shared_projections(config, in_features, out_features, peers, dtype, device) -> _Projections:
    peers = tuple(peers)
    if len({p.config for p in peers}) > 1:  # validate_site refuses it at plan time; this guards adapters built by hand
        raise PlanError(
            f"adapter '{peers[0].adapter}' gives its VeRA sites different arguments, but they share one A and B",
            hint="use the same vera(...) arguments for every site of an adapter (as PEFT, which holds one VeRA config per adapter)",
        )
    key = tuple(id(p) for p in peers)
    shared = _SHARED.get(key) if peers else None
    if shared is None:
        max_in = max((in_features, *(p.in_features for p in peers)))
        max_out = max((out_features, *(p.out_features for p in peers)))
        if device is not None and torch.device(device).type == "meta":  # shapes only (a load checks a file against them): nothing drawn
            a, b = torch.empty(config.r, max_in, device="meta"), torch.empty(max_out, config.r, device="meta")
        else:
            a, b = projections(config.r, max_in, max_out, config.projection_prng_key)
        shared = _Projections(a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device), peers)
        if peers:
            _SHARED[key] = shared
    return shared


class VeraWeights(SiteAdapter):
    method = VeraConfig.method_name
    peft_format = VeraPeft

    @classmethod
    def validate_site(cls, site, context) -> list:
        """A site whose arguments differ from the adapter's first VeRA site (they share one A and B)."""
        first = context.peers[0] if context.peers else site
        if site.config == first.config:
            return []
        keys = [k for k, v in site.params.items() if v != first.params.get(k)]

        def given(s):
            return ", ".join(f"{k}={format_value(s.params[k])}" for k in keys)

        return [SiteProblem("vera-arguments", f"adapter '{site.adapter}' gives its VeRA sites different arguments, but they "
                            f"share one A and B: {first.path} (line {first.rule_line}) has {given(first)}, {site.path} has {given(site)}",
                            "use the same vera(...) arguments for every site of an adapter (as PEFT, which holds one VeRA "
                            "config per adapter)")]

    def __init__(self, config, kind, in_features, out_features, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        factory = {"dtype": dtype, "device": device}
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **factory))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **factory))
        self._projections = _shared_projections(config, in_features, out_features, peers, dtype, device)
        self._projections.users += 1
        self._view()

    def _view(self) -> None:
        """This site's corner of the shared pair, as buffers (what the insert pass registers on the graph)."""
        shared = self._projections
        self.register_buffer("vera_A", shared.a[:, : self.in_features])
        self.register_buffer("vera_B", shared.b[: self.out_features, :])

    def _apply(self, fn, recurse=True):
        # nn.Module would convert each site's view into a tensor of its own: convert the
        # adapter's pair once per conversion (the first site to see it) and view it again.
        self._projections.convert(fn)
        del self._buffers["vera_A"], self._buffers["vera_B"]
        try:
            super()._apply(fn, recurse)
        finally:
            self._view()
        return self

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """dW = diag(b) B_s diag(d) A_s, (out, in), in ``dtype``."""
        b = self.vera_lambda_b.to(dtype).unsqueeze(-1) * self.vera_B.to(dtype)
        a = self.vera_lambda_d.to(dtype).unsqueeze(-1) * self.vera_A.to(dtype)
        return b @ a

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        dtype = self.vera_lambda_d.dtype
        x_in = graph.cast(x, dtype)
        if graph.training and self.config.dropout > 0:
            x_in = graph.call(aten.dropout.default, (x_in, self.config.dropout, True), roles.DROPOUT)
        h = graph.call(aten.linear.default, (x_in, graph.param("vera_A")), roles.SHRINK)
        h = graph.call(aten.mul.Tensor, (graph.param("vera_lambda_d"), h), roles.SCALE)
        d = graph.call(aten.linear.default, (h, graph.param("vera_B")), roles.EXPAND)
        d = graph.call(aten.mul.Tensor, (graph.param("vera_lambda_b"), d), roles.SCALE)
        return None, graph.call(aten.add.Tensor, (y, graph.cast(d, graph.dtype_of(graph.base), dtype)), roles.OUT)

    def fold(self, weight, bias, kind: str):
        delta = self.delta(torch.float32)
        return weight + (delta.T if kind == "hf_conv1d" else delta), bias

    def eager(self, module, x, y):
        x = x.to(self.vera_lambda_d.dtype)
        if module.training and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, True)
        d = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, self.vera_A), self.vera_B)
        return y + d.to(y.dtype)

    def peft_state(self) -> dict:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @classmethod
    def peft_shared_state(cls, modules: list) -> dict:
        if not modules or not modules[0].config.save_projection:
            return {}
        shared = modules[0]._projections
        return dict(zip(SHARED_KEYS, (shared.a, shared.b)))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.config.r}"
