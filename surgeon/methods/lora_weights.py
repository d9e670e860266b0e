"""LoRA on a site (torch; lora.py holds the torch-free config).

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

from surgeon.methods.peft_format import AdapterError, common, lora_family_config, lora_family_rules, refuse

from surgeon.methods.adapter import SiteAdapter, site_adapter

__all__ = ["LoraWeights"]


@site_adapter("lora")
class LoraWeights(SiteAdapter):
    peft_type = "LORA"
    applies_gate = True  # the gate multiplies the scale
    peft_required = ("r", "lora_alpha", "target_modules")

    def __init__(self, config, kind: str, in_features: int, out_features: int, *, dtype=torch.float32, device=None, weight=None, peers=()):
        super().__init__(config, kind, in_features, out_features)
        factory = {"dtype": dtype, "device": device}
        kernel = tuple(weight.shape[2:]) if kind.startswith("conv") else ()
        # A grouped convolution (weight (out, in/g, *k)): A sees every input channel, B is grouped (PEFT's layout).
        self.groups = in_features // weight.shape[1] if kernel else 1
        if config.r % self.groups:  # planning refuses it first (validate_site); this guards adapters built by hand
            from surgeon.diagnostics import PlanError

            raise PlanError(f"LoRA on a convolution with {self.groups} groups needs a rank divisible by {self.groups}, not {config.r}")
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, *kernel, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r // self.groups, *((1,) * len(kernel)), **factory))
        self.lora_B_bias = nn.Parameter(torch.zeros(out_features, **factory)) if config.bias else None
        self.reset_parameters()
        self.residual = config.init in ("pissa", "olora") or config.init.startswith("pissa_niter_")
        if self.residual:
            self._start_from_weight(weight, **factory)

    @classmethod
    def validate_site(cls, site, context) -> list:
        """What the constructor would refuse: a rank the conv's groups do not divide, PiSSA/OLoRA on a site
        they are not defined for or on a weight without values."""
        from surgeon.methods.adapter import SiteProblem

        config, kind, path, problems = site.config, site.kind, site.path, []
        if kind.startswith("conv") and len(site.weight_shape) > 2:
            groups = max(1, site.in_features // site.weight_shape[1])
            if config.r % groups:
                problems.append(SiteProblem(
                    "rank-groups", f"{cls.method} on {path}: a convolution with {groups} groups needs a rank divisible by "
                    f"{groups}, not {config.r}",
                    f"B is a 1x1 convolution grouped as the base (PEFT's layout): use r={-(-config.r // groups) * groups}"))
        init = getattr(config, "init", "kaiming")
        if init in ("pissa", "olora") or init.startswith("pissa_niter_"):
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

    def _start_from_weight(self, weight, dtype, device) -> None:
        """PiSSA / OLoRA: A0, B0 from the base weight; the base becomes W - s B0 A0 (kept as A0, B0).

        PEFT writes the residual into the base weight; surgeon keeps the user's
        weight and subtracts s x A0^T B0^T in the graph: a rank-r correction, so
        no copy of W is held.
        """
        from surgeon.diagnostics import PlanError

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

    def delta(self, dtype=torch.float32) -> torch.Tensor:
        """scale * B @ A, shape (out, in) (a conv: the composed kernel (out, in, kh, kw)), in ``dtype``."""
        a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)
        if self.kind.startswith("conv"):  # B is 1x1: compose the kernels
            if self.groups > 1:
                from surgeon.passes import FoldError

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
            a_t = graph.call(aten.t.default, (graph.param("lora_A"),), "rows")
            h = graph.call(aten.embedding.default, (a_t, x), "shrink")
            d = graph.call(aten.linear.default, (h, graph.param("lora_B")), "expand")
            s = graph.cast(graph.call(aten.mul.Tensor, (d, graph.gated(self.scale)), "scale"), graph.dtype_of(graph.base), self.lora_A.dtype)
            return None, graph.call(aten.add.Tensor, (y, s), "out")
        x_in = graph.cast(x, self.lora_A.dtype)
        if graph.training and self.config.dropout > 0:
            x_in = graph.call(aten.dropout.default, (x_in, self.config.dropout, True), "dropout")
        bias = (graph.param("lora_B_bias"),) if self.lora_B_bias is not None else ()
        if self.kind.startswith("conv"):  # A: the base's kernel, stride, padding, dilation; B: 1x1, grouped as the base
            stride, padding, dilation = _conv_geometry(graph.base)
            op, ones = graph.base.target, [1] * len(stride)
            h = graph.call(op, (x_in, graph.param("lora_A"), None, stride, padding, dilation), "shrink")
            b_bias = bias[0] if bias else None
            d = graph.call(op, (h, graph.param("lora_B"), b_bias, ones, [0] * len(stride), ones, self.groups), "expand")
        else:
            h = graph.call(aten.linear.default, (x_in, graph.param("lora_A")), "shrink")
            d = graph.call(aten.linear.default, (h, graph.param("lora_B")) + bias, "expand")
        if self.residual:  # the base is W - s B0 A0 (PiSSA, OLoRA): subtract s x A0^T B0^T, without dropout
            x0 = graph.cast(x, self.lora_A.dtype)
            h0 = graph.call(aten.linear.default, (x0, graph.param("lora_A_initial")), "shrink")
            d0 = graph.call(aten.linear.default, (h0, graph.param("lora_B_initial")), "expand")
            d = graph.call(aten.sub.Tensor, (d, d0), "residual")
        s = graph.cast(graph.call(aten.mul.Tensor, (d, graph.gated(self.scale)), "scale"), graph.dtype_of(graph.base), self.lora_A.dtype)
        return None, graph.call(aten.add.Tensor, (y, s), "out")

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
                from surgeon.passes import FoldError

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

    @classmethod
    def peft_config(cls, sites) -> dict:
        """PEFT's LoraConfig fields for these sites (DoRA: the same with ``use_dora``).

        PiSSA/OLoRA sites are written as plain LoRA of twice the rank (see peft_saved_state).
        """
        converted = {s.path for s in sites if s.config.init in ("pissa", "olora") or s.config.init.startswith("pissa_niter_")}
        fields = lora_family_config(sites, rank_of=lambda s: s.config.r * (2 if s.path in converted else 1))
        inits = [s.config.init for s in sites if s.path not in converted] or ["kaiming"]
        fields["lora_alpha"] = fields.pop("alpha")
        return dict(
            fields,
            lora_dropout=common(s.config.dropout for s in sites),
            lora_bias=any(s.config.bias for s in sites),
            fan_in_fan_out=any(s.kind == "hf_conv1d" for s in sites),
            init_lora_weights={"kaiming": True, "gaussian": "gaussian", "zeros": False, "loftq": True}[inits[0]],
            bias="none",
            use_dora=cls.method == "dora",
        )

    @classmethod
    def peft_saved_configs(cls, sites) -> list:
        """Each site's config as the file holds it: PiSSA/OLoRA as plain LoRA of rank 2r, LoftQ's as plain LoRA.

        The scale stays the site's own; how a fresh adapter would start (init) is
        what the PEFT config says, since the saved weights replace it.
        """
        from dataclasses import replace

        saved = []
        for site in sites:
            config = site.config
            if config.init in ("pissa", "olora") or config.init.startswith("pissa_niter_"):
                alpha = config.r if config.alpha is None else config.alpha
                alpha = alpha * math.sqrt(2) if config.rslora else 2 * alpha  # s = alpha/r with twice the rank
                config = replace(config, r=2 * config.r, alpha=alpha, init="kaiming")
            elif config.init == "loftq":
                config = replace(config, init="kaiming", loftq_iter=1)
            saved.append(config)
        return saved

    @classmethod
    def rules_from_peft(cls, config: dict) -> list:
        refuse(config, "layer_replication", "alora_invocation_tokens", "target_parameters")
        dora = bool(config.get("use_dora"))
        init = config.get("init_lora_weights", True)
        pissa = isinstance(init, str) and (init in ("pissa", "olora") or init.startswith("pissa_niter_"))
        if dora and (config.get("lora_bias") or pissa):
            # surgeon's dora has neither a bias of B nor a start from the base weight's SVD/QR
            field = "lora_bias" if config.get("lora_bias") else f"init_lora_weights={init!r}"
            raise AdapterError(f"LoRA's use_dora with {field} is not supported yet", hint="dora takes r, alpha, dropout and rslora")
        extra = ([("rslora", True)] if config.get("use_rslora") else []) + ([("bias", True)] if config.get("lora_bias") else [])
        if pissa:
            # PEFT's own PiSSA/OLoRA files: the residual base is made again from the base weight, as PEFT does
            extra.append(("init", init))
        elif isinstance(init, str) and init != "gaussian":
            raise AdapterError(f"LoRA's init_lora_weights={init!r} is not supported yet", hint="supported: true, false, gaussian, pissa, pissa_niter_K, olora")
        if config.get("lora_dropout"):
            extra.append(("dropout", config["lora_dropout"]))
        return lora_family_rules(config, "dora" if dora else "lora", extra=extra)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.config.r}, scale={self.scale:g}"


def _conv_geometry(node) -> tuple:
    """(stride, padding, dilation) of an aten.convNd node, its defaults filled in."""
    n = len(node.args[1].meta["val"].shape) - 2 if "val" in node.args[1].meta else 2
    args = list(node.args) + [None] * (7 - len(node.args))
    names = ("stride", "padding", "dilation")
    defaults = ([1] * n, [0] * n, [1] * n)
    return tuple(
        args[3 + i] if args[3 + i] is not None else node.kwargs.get(name, default)
        for i, (name, default) in enumerate(zip(names, defaults))
    )
