"""LoRA on a site (torch; config.py holds the torch-free config and the math).

    A: (r, in_features)    B: (out_features, r)    optional bias of B: (out_features,)
    y' = y + scale * (dropout(x) A^T B^T + b_B)

Initialisation follows PEFT: ``kaiming`` gives A kaiming-uniform (a = sqrt(5),
as ``nn.Linear``), ``gaussian`` gives A a normal with std 1/r, and B starts at
zero, so the adapted model starts equal to the base; ``zeros`` starts both at
zero (for weights that will be loaded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.diagnostics import FoldError, PlanError

from surgeon.methods import node_roles as roles
from surgeon.methods.adapter import SiteAdapter, SiteProblem
from surgeon.methods.lora.config import QUANTIZED_INITS, LoraConfig
from surgeon.methods.lora.loftq import loftq_start
from surgeon.methods.lora.peft import LoraPeft

__all__ = ["LoraWeights", "loftq_problems", "conv_geometry"]


def loftq_problems(site, context) -> list:
    """What LoftQ's arguments and a quantized base refuse (the SiteProblems of any LoRA site)."""
    config, init, found = site.config, getattr(site.config, "init", None), []
    method, path, model = site.method, site.path, context.model
    if getattr(config, "loftq_iter", 1) != 1 and init != "loftq":
        found.append(SiteProblem("loftq-iter", f"loftq_iter={config.loftq_iter} on {path} does nothing without "
                                 "init=\"loftq\"", f"write {method}(init=\"loftq\", loftq_iter=N)"))
    if site.quantization is None:
        if init == "loftq":
            found.append(SiteProblem("loftq-unquantized", f"{method}(init=\"loftq\") on {path} of {model}: its weight is "
                                     "not quantized", "LoftQ starts an adapter from the quantization error of a "
                                     "bitsandbytes-quantized base (e.g. demo:llama-nf4)"))
        return found
    if init not in QUANTIZED_INITS:
        found.append(SiteProblem("quantized-site", f"{method}(init={init!r}) cannot adapt {path} of {model}: its weight is "
                                 f"quantized ({site.quantization})", f"on quantized linears use {context.quantized_methods}, "
                                 "or load the model unquantized"))
    elif init == "loftq" and not context.full_precision:
        found.append(SiteProblem("loftq-full-precision", f"{method}(init=\"loftq\") on {path} needs the unquantized weights "
                                 f"of {model}, and none were given", "LoftQ starts from W - Q(W): surgeon.compile(model, "
                                 "rules, full_precision=<the unquantized model, state dict or folder>)"))
    if getattr(config, "bias", False):
        found.append(SiteProblem("quantized-site", f"{method}(bias=true) on {path} of {model}: a bias of B cannot be folded "
                                 f"into a quantized linear ({site.quantization})", f"use {method}(bias=false) on quantized linears"))
    return found


class LoraWeights(SiteAdapter):
    method = LoraConfig.method_name
    peft_format = LoraPeft
    applies_gate = True  # the gate multiplies the scale
    adapts_quantized = True  # the branch reads only the site's input and output; folding dequantizes

    def __init__(self, config, kind: str, in_features: int, out_features: int, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        factory = {"dtype": dtype, "device": device}
        kernel = tuple(weight.shape[2:]) if kind.startswith("conv") else ()
        # A grouped convolution (weight (out, in/g, *k)): A sees every input channel, B is grouped (PEFT's layout).
        self.groups = in_features // weight.shape[1] if kernel else 1
        if config.r % self.groups:  # planning refuses it first (validate_site); this guards adapters built by hand
            raise PlanError(f"LoRA on a convolution with {self.groups} groups needs a rank divisible by {self.groups}, not {config.r}")
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, *kernel, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r // self.groups, *((1,) * len(kernel)), **factory))
        self.lora_B_bias = nn.Parameter(torch.zeros(out_features, **factory)) if config.bias else None
        self.reset_parameters()
        self.residual = config.residual
        self.starts_from_full_precision = config.init == "loftq"
        if self.residual:
            self._start_from_weight(weight, **factory)

    @classmethod
    def validate_site(cls, site, context) -> list:
        """What the constructor would refuse: a rank the conv's groups do not divide, PiSSA/OLoRA on a site
        they are not defined for or on a weight without values; and LoftQ's and a quantized base's limits."""
        config, kind, path, problems = site.config, site.kind, site.path, loftq_problems(site, context)
        if kind.startswith("conv") and len(site.weight_shape) > 2:
            groups = max(1, site.in_features // site.weight_shape[1])
            if config.r % groups:
                problems.append(SiteProblem(
                    "rank-groups", f"{cls.method} on {path}: a convolution with {groups} groups needs a rank divisible by "
                    f"{groups}, not {config.r}",
                    f"B is a 1x1 convolution grouped as the base (PEFT's layout): use r={-(-config.r // groups) * groups}"))
        init = config.init
        if config.residual:
            allowed = ("linear",) if init == "olora" else ("linear", "hf_conv1d")
            if kind not in allowed:
                other = 'init="pissa" or "kaiming"' if kind == "hf_conv1d" else 'init="kaiming"'
                problems.append(SiteProblem(
                    "init-site", f'{cls.method}(init="{init}") on {path} needs a Linear{" or Conv1D" if len(allowed) > 1 else ""} '
                    f"site, not {kind}", f"on {kind} sites use {other}, or narrow the rule to linear layers"))
            elif not context.weight_values:
                problems.append(SiteProblem(
                    "init-weight", f'{cls.method}(init="{init}") on {path} starts from the base weight\'s values, which this '
                    "model does not have (its weights are on the meta device)",
                    "load the weights first (to_empty() then load_state_dict(), or from_pretrained), or use init=\"kaiming\""))
        return problems

    @classmethod
    def quantized_limits(cls) -> str:
        return f"init {', '.join(QUANTIZED_INITS)}"

    def _start_from_weight(self, weight, dtype, device) -> None:
        """PiSSA / OLoRA: A0, B0 from the base weight; the base becomes W - s B0 A0 (kept as A0, B0).

        PEFT writes the residual into the base weight; surgeon keeps the user's
        weight and subtracts s x A0^T B0^T in the graph: a rank-r correction, so
        no copy of W is held.
        """
        init, kind = self.config.init, self.kind
        # validate_site refuses both at plan time; these guard adapters built without a plan
        if kind not in ("linear", "hf_conv1d") or (init == "olora" and kind != "linear"):
            raise PlanError(f"lora(init={init!r}) needs a Linear{'' if init == 'olora' else ' or Conv1D'} site, not {kind}")
        if weight is None or weight.device.type == "meta" or weight.is_floating_point() is False:
            raise PlanError(f"lora(init={init!r}) starts from the base weight's values, which this model does not have")
        with torch.no_grad():
            w = weight.detach().to(torch.float32)
            w = w.T if kind == "hf_conv1d" else w  # (out, in)
            r, s = self.config.r, self.scale
            if init == "olora":
                q, upper = torch.linalg.qr(w)
                b0, a0 = q[:, :r], upper[:r]
            else:
                if init == "pissa":
                    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                    u, sv, vh = u[:, :r], sv[:r], vh[:r]
                else:  # randomized SVD, K iterations (not reproducible: saved adapters are converted, see peft_saved_state)
                    u, sv, v = torch.svd_lowrank(w, r, niter=int(init.rpartition("_")[2]))
                    vh = v.T
                root = torch.sqrt(sv / s)
                b0, a0 = u * root, root.unsqueeze(1) * vh
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)
        self.register_buffer("lora_A_initial", a0.to(dtype=dtype, device=device).contiguous())
        self.register_buffer("lora_B_initial", b0.to(dtype=dtype, device=device).contiguous())

    def start_from_full_precision(self, module, weight) -> dict:
        """LoftQ (loftq.py): s B A starts at the low-rank part of W - Q(W) for the bitsandbytes ``module``."""
        return loftq_start(self, module, weight, self.config.loftq_iter)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.kind == "embedding":  # PEFT: A zero, B as nn.Embedding initialises
                self.lora_A.zero_()
                nn.init.normal_(self.lora_B)
                return
            if self.config.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.config.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.config.r)
            else:
                self.lora_A.zero_()
            self.lora_B.zero_()
            if self.lora_B_bias is not None:
                self.lora_B_bias.zero_()

    @property
    def scale(self) -> float:
        return self.config.scale

    def low_rank_refusal(self) -> str | None:
        detail = (", with a bias on B" if self.lora_B_bias is not None
                  else f", started from the base weight (init=\"{self.config.init}\")" if self.residual else "")
        if self.kind in ("linear", "hf_conv1d") and not detail:
            return None
        return f"{self.method} on {self.where()} ({self.kind}{detail})"

    def low_rank_factors(self):
        return None if self.low_rank_refusal() is not None else (self.lora_A, self.lora_B, self.scale)

    def load_low_rank_factors(self, a, b) -> None:
        if self.low_rank_refusal() is not None:
            super().load_low_rank_factors(a, b)
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """scale * B @ A, shape (out, in) (a conv: the composed kernel (out, in, kh, kw)), in ``dtype``."""
        a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)
        if self.kind.startswith("conv"):  # B is 1x1: compose the kernels
            if self.groups > 1:
                raise FoldError(
                    f"LoRA on a convolution with {self.groups} groups cannot be folded: its update B A is a full "
                    f"kernel over all {self.in_features} input channels, the base kernel sees {self.in_features // self.groups} per group",
                    hint="keep the adapter unmerged for this site (PEFT cannot merge it either)",
                )
            return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scale
        if getattr(self, "residual", False):  # the residual base: W - s B0 A0
            return (b @ a - self.lora_B_initial.to(dtype) @ self.lora_A_initial.to(dtype)) * self.scale
        return (b @ a) * self.scale

    def branch(self, graph, x, y):
        aten = torch.ops.aten
        if self.kind == "embedding":  # x holds token ids
            a_t = graph.call(aten.t.default, (graph.param("lora_A"),), roles.ROWS)
            h = graph.call(aten.embedding.default, (a_t, x), roles.SHRINK)
            d = graph.call(aten.linear.default, (h, graph.param("lora_B")), roles.EXPAND)
            s = graph.cast(graph.call(aten.mul.Tensor, (d, graph.gated(self.scale)), roles.SCALE), graph.dtype_of(graph.base), self.lora_A.dtype)
            return None, graph.call(aten.add.Tensor, (y, s), roles.OUT)
        x_in = graph.cast(x, self.lora_A.dtype)
        if graph.training and self.config.dropout > 0:
            x_in = graph.call(aten.dropout.default, (x_in, self.config.dropout, True), roles.DROPOUT)
        bias = (graph.param("lora_B_bias"),) if self.lora_B_bias is not None else ()
        if self.kind.startswith("conv"):  # A: the base's kernel, stride, padding, dilation; B: 1x1, grouped as the base
            stride, padding, dilation = conv_geometry(graph.base)
            op, ones = graph.base.target, [1] * len(stride)
            h = graph.call(op, (x_in, graph.param("lora_A"), None, stride, padding, dilation), roles.SHRINK)
            b_bias = bias[0] if bias else None
            d = graph.call(op, (h, graph.param("lora_B"), b_bias, ones, [0] * len(stride), ones, self.groups), roles.EXPAND)
        else:
            h = graph.call(aten.linear.default, (x_in, graph.param("lora_A")), roles.SHRINK)
            d = graph.call(aten.linear.default, (h, graph.param("lora_B")) + bias, roles.EXPAND)
        if self.residual:  # the base is W - s B0 A0 (PiSSA, OLoRA): subtract s x A0^T B0^T, without dropout
            x0 = graph.cast(x, self.lora_A.dtype)
            h0 = graph.call(aten.linear.default, (x0, graph.param("lora_A_initial")), roles.SHRINK)
            d0 = graph.call(aten.linear.default, (h0, graph.param("lora_B_initial")), roles.EXPAND)
            d = graph.call(aten.sub.Tensor, (d, d0), roles.RESIDUAL)
        s = graph.cast(graph.call(aten.mul.Tensor, (d, graph.gated(self.scale)), roles.SCALE), graph.dtype_of(graph.base), self.lora_A.dtype)
        return None, graph.call(aten.add.Tensor, (y, s), roles.OUT)

    def fold(self, weight, bias, kind: str):
        if kind in ("linear", "hf_conv1d", "embedding") and not getattr(self, "residual", False):
            # one pass over W: W + s B A (or its transpose) as a single addmm, no (out, in) temporaries
            a, b = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
            pair = (b, a) if kind == "linear" else (a.T, b.T)
            weight = torch.addmm(weight, *pair, alpha=self.scale)
        else:
            delta = self.delta(weight.dtype)
            weight = weight + (delta.T if kind in ("hf_conv1d", "embedding") else delta)
        if self.lora_B_bias is not None:
            if bias is None:
                raise FoldError("cannot fold a LoRA bias into a module that has no bias")
            bias = bias + self.lora_B_bias.to(bias.dtype) * self.scale
        return weight, bias

    def eager(self, module, x, y):
        if self.kind == "embedding":
            return y + (F.embedding(x, self.lora_A.T) @ self.lora_B.T * self.scale).to(y.dtype)
        x0 = x_in = x.to(self.lora_A.dtype)
        if module.training and self.config.dropout > 0:
            x_in = F.dropout(x0, self.config.dropout, True)
        if self.kind.startswith("conv"):
            conv = getattr(F, self.kind)
            h = conv(x_in, self.lora_A, None, module.stride, module.padding, module.dilation)
            return y + (conv(h, self.lora_B, self.lora_B_bias, groups=self.groups) * self.scale).to(y.dtype)
        d = F.linear(F.linear(x_in, self.lora_A), self.lora_B, self.lora_B_bias)
        if self.residual:
            d = d - F.linear(F.linear(x0, self.lora_A_initial), self.lora_B_initial)
        return y + (d * self.scale).to(y.dtype)

    def peft_state(self) -> dict:
        if self.kind == "embedding":  # PEFT keeps these as raw parameters: no ".weight"
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        state = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.lora_B_bias is not None:
            state["lora_B.bias"] = self.lora_B_bias
        return state

    def peft_saved_state(self) -> dict:
        """What is written for PEFT: with PiSSA/OLoRA, a plain LoRA of rank 2r on the original base.

        s (B A - B0 A0) = s [B, -B0] [A; A0], as PEFT's own conversion for
        sharing (``path_initial_model_for_weight_conversion``): the file is
        right for the untouched base model, and needs no SVD to be redone.
        """
        state = self.peft_state()
        if self.residual:
            state["lora_A.weight"] = torch.cat([self.lora_A, self.lora_A_initial.to(self.lora_A.dtype)], dim=0)
            state["lora_B.weight"] = torch.cat([self.lora_B, -self.lora_B_initial.to(self.lora_B.dtype)], dim=1)
        return state

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.config.r}, scale={self.scale:g}"


def conv_geometry(node) -> tuple:
    """(stride, padding, dilation) of an aten.convNd node, its defaults filled in."""
    n = len(node.args[1].meta["val"].shape) - 2 if "val" in node.args[1].meta else 2
    args = list(node.args) + [None] * (7 - len(node.args))
    names = ("stride", "padding", "dilation")
    defaults = ([1] * n, [0] * n, [1] * n)
    return tuple(
        args[3 + i] if args[3 + i] is not None else node.kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults))
    )
