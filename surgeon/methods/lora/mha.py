"""LoRA on ``nn.MultiheadAttention``: its packed in-projection and its ``out_proj``, as PEFT adapts them.

``F.multi_head_attention_forward`` runs both projections in the MHA's own frame,
``qkv = x W_in^T + b_in`` (``in_proj_weight``, (3E, E)) and ``out = a W_out^T + b_out``
(``out_proj.weight``, (E, E)), so capture makes them one site at the MHA's path
(``Site.parts``, surgeon/capture/sites.py). PEFT's ``lora.MultiheadAttention`` (what
``target_modules=["attn"]`` makes) gives each its own LoRA, under these keys::

    in-projection:  A (r, E), B (3E, r)   <path>.lora_A.weight, <path>.lora_B.weight
    out_proj:       A (r, E), B (E, r)    <path>.base_layer.out_proj.lora_A.weight, ....lora_B.weight

and, for every forward, merges ``s B A`` into both weights. Surgeon computes the
same as branches, ``y + s x A^T B^T`` at each projection (equal outputs and
gradients), and folds them as PEFT merges. What PEFT's merged forward cannot
have is refused (a bias on B, starts read from the weight: PiSSA, OLoRA, LoftQ)
or, for dropout, not applied (with a warning), as in PEFT; PEFT adapts MHA with
LoRA only, so other methods are refused, located at their rule.

PEFT 0.21's ``merge()`` adds out_proj's update twice (``W_out + 2 s B A`` in
its forward and in ``merge_and_unload``; huggingface/peft PR #3774 fixes it).
Surgeon computes ``W_out + s B A``, as LoRA is defined and as that fix does:
an adapter trained in such a PEFT runs here with half its out_proj update.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from surgeon.diagnostics import Diagnostic, PlanError, SurgeryError

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter, SiteProblem
from surgeon.methods.lora.config import LoraConfig
from surgeon.methods.lora.peft import LoraPeft
from surgeon.methods.lora.site import loftq_problems

__all__ = ["MhaLoraWeights", "mha_adapter", "mha_problems", "MHA_INITS"]

MHA_INITS = ("kaiming", "gaussian", "zeros")
_PROJECTIONS = {"in_proj_weight": ("lora_A", "lora_B"), "out_proj.weight": ("out_proj_lora_A", "out_proj_lora_B")}


def mha_problems(site) -> list:
    """The SiteProblems of the plan site ``site`` on a MultiheadAttention site (planning can report them at the
    rule; :func:`mha_adapter` raises them)."""
    what, config = f"{site.path} (MultiheadAttention)", site.config
    if site.method != LoraConfig.method_name:
        return [SiteProblem("mha-method", f"{site.method} cannot adapt {what}: its projections run inside "
                            "F.multi_head_attention_forward, where surgeon adapts them with LoRA only (as PEFT does)",
                            "use lora on MultiheadAttention modules, or exclude them from this rule")]
    problems = []
    if config.init not in MHA_INITS:
        problems.append(SiteProblem("mha-init", f"lora(init={config.init!r}) cannot adapt {what}: PEFT adapts "
                                    "MultiheadAttention by merging a plain LoRA into its weights",
                                    f"use init {', '.join(repr(i) for i in MHA_INITS)} there"))
    if config.bias:
        problems.append(SiteProblem("mha-bias", f"lora(bias=true) cannot adapt {what}: PEFT's merged MultiheadAttention "
                                    "has no bias of B", "use lora(bias=false) on MultiheadAttention modules"))
    return problems


def mha_adapter(site, captured, rules, *, dtype, device) -> "MhaLoraWeights":
    """The adapter of plan site ``site`` on a MultiheadAttention site (``captured``: its capture Site),
    or a PlanError located at the rule that put it there (``rules``; None: at no rule)."""
    problems = mha_problems(site)
    if problems:
        raise PlanError([_located(site, rules, problem) for problem in problems])
    if site.config.dropout:
        warnings.warn(f"lora(dropout={site.config.dropout}) on {site.path} (MultiheadAttention) is not applied: PEFT "
                      "merges the adapter into the projections for each forward, which leaves no input to drop "
                      "(surgeon computes the same)", stacklevel=3)
    (_, (three_e, e)), (_, out_shape) = captured.parts
    return MhaLoraWeights(site.config, site.kind, e, three_e, out_shape, dtype=dtype, device=device)


def _located(site, rules, problem) -> Diagnostic:
    """``problem`` as a diagnostic at the rule that chose ``site`` (found by its line)."""
    if rules is None:
        return Diagnostic(problem.code, problem.message, None, problem.hint)
    rule = None
    try:
        rule = next((r for r in rules.adapter(site.adapter).rules if r.span and r.span.line == site.rule_line), None)
    except KeyError:
        pass
    span = rule.span if rule is not None else None
    source = rules.source_line(span.line) if span else None
    return Diagnostic(problem.code, problem.message, span, problem.hint, file=rules.path, source_line=source)


class MhaLoraWeights(SiteAdapter):
    """LoRA on a MultiheadAttention site: one (A, B) pair per projection, one scale (one rule)."""

    method = LoraConfig.method_name
    peft_format = LoraPeft
    applies_gate = True  # the gate multiplies the scale, as LoRA's
    # Two (A, B) pairs, not one on one weight: no low_rank_factors (merging and hot swaps refuse it);
    # ``residual`` says the same to the callers that read it.
    residual = True

    @classmethod
    def validate_site(cls, site, context) -> list:
        """LoftQ's limits, as on any LoRA site, then what PEFT's merged MultiheadAttention cannot have."""
        return loftq_problems(site, context) + mha_problems(site)

    @classmethod
    def for_site(cls, site, captured_site=None, rules=None, *, dtype, device, weight=None, peers=()) -> "MhaLoraWeights":
        return mha_adapter(site, captured_site, rules, dtype=dtype, device=device)

    def low_rank_refusal(self) -> str:
        return f"{self.method} on {self.where()} (MultiheadAttention: an update of each of two projections)"

    def __init__(self, config, kind: str, in_features: int, out_features: int, out_shape: tuple, *, dtype=torch.float32,
                 device=None):
        super().__init__(config, kind, in_features, out_features)
        factory = {"dtype": dtype, "device": device}
        r = config.r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **factory))
        self.out_proj_lora_A = nn.Parameter(torch.empty(r, out_shape[1], **factory))
        self.out_proj_lora_B = nn.Parameter(torch.zeros(out_shape[0], r, **factory))
        self.lora_B_bias = None
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.config.scale

    def reset_parameters(self) -> None:
        """As LoRA's (and PEFT's) on a linear: A kaiming-uniform or normal(1/r), B zero; "zeros" both zero."""
        with torch.no_grad():
            for a, b in ((self.lora_A, self.lora_B), (self.out_proj_lora_A, self.out_proj_lora_B)):
                if self.config.init == "kaiming":
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                elif self.config.init == "gaussian":
                    nn.init.normal_(a, std=1 / self.config.r)
                else:
                    a.zero_()
                b.zero_()

    def projection(self, weight_name: str) -> tuple:
        """(A, B) parameter names of the projection reading ``weight_name`` (relative to the MHA module)."""
        if weight_name not in _PROJECTIONS:
            raise SurgeryError(f"{self._where()}: a MultiheadAttention site has no projection on {weight_name!r}")
        return _PROJECTIONS[weight_name]

    def _where(self) -> str:
        return getattr(self, "site_path", "a MultiheadAttention site")  # set by the compiled model

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        weight = graph.weight()
        if weight.op != "get_attr" or not weight.target.startswith(graph.spec.path + "."):
            raise SurgeryError(f"{graph.spec.path}: a MultiheadAttention projection reads a computed weight ({weight})")
        a, b = self.projection(weight.target[len(graph.spec.path) + 1:])
        x_in = graph.cast(x, self.lora_A.dtype)  # no dropout: PEFT's merged forward has none
        h = graph.call(aten.linear.default, (x_in, graph.param(a)), roles.SHRINK)
        d = graph.call(aten.linear.default, (h, graph.param(b)), roles.EXPAND)
        s = graph.cast(graph.call(aten.mul.Tensor, (d, graph.gated(self.scale)), roles.SCALE), graph.dtype_of(graph.base), self.lora_A.dtype)
        return None, graph.call(aten.add.Tensor, (y, s), roles.OUT)

    def for_weight(self, weight_name: str) -> "_Projection":
        """What folds into the weight ``weight_name`` (relative to the MHA module): the fold pass asks per weight."""
        return _Projection(self, *self.projection(weight_name))

    def fold(self, weight, bias, kind: str):
        raise SurgeryError(f"{self._where()}: a MultiheadAttention site folds per projection",
                           hint="fold it with fold() (the fold pass asks for_weight(...) per weight)")

    def eager(self, module, x, y):
        raise self._no_eager()

    def hook(self):
        raise self._no_eager()

    def _no_eager(self) -> SurgeryError:
        return SurgeryError(
            f"attach() cannot hook LoRA into {self._where()} (MultiheadAttention): its projections run inside "
            "F.multi_head_attention_forward, where no forward hook reaches",
            hint="call the compiled model, or fold(inplace=True) the adapters into the model's weights for generate()",
        )

    def peft_state(self) -> dict:
        return {
            "lora_A.weight": self.lora_A,
            "lora_B.weight": self.lora_B,
            "base_layer.out_proj.lora_A.weight": self.out_proj_lora_A,
            "base_layer.out_proj.lora_B.weight": self.out_proj_lora_B,
        }

    def extra_repr(self) -> str:
        e = self.out_proj_lora_B.shape[0]
        return f"in_proj: in={self.in_features}, out={self.out_features}; out_proj: in={e}, out={e}; r={self.config.r}, scale={self.scale:g}"


class _Projection:
    """One projection of a MultiheadAttention LoRA, as the fold pass folds it: W + s B A."""

    follows_ties = False

    def __init__(self, owner: MhaLoraWeights, a: str, b: str):
        self.owner, self.a, self.b = owner, a, b

    def fold(self, weight, bias, kind: str):
        a, b = getattr(self.owner, self.a).to(weight.dtype), getattr(self.owner, self.b).to(weight.dtype)
        return torch.addmm(weight, b, a, alpha=self.owner.scale), bias
