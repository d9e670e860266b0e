"""The plan: exactly what a rule set will do to a model, computed without touching weights.

``build_plan(rule_set, captured)`` resolves the rules against the captured
model (surgeon.planning.select) and records, for each site, the adapter, method,
arguments, shapes and the trainable parameters it adds; for each rule, the
modules it matched and won; totals; per-layer coverage. ``Plan.to_json()`` has
a stable schema (``PLAN_SCHEMA_VERSION``). Every site a rule wins is checked as
compile will build it (its method's ``validate_site``, quantized bases, a weight
two adapters would replace), so that what compile refuses, the plan refuses
first, at the rule.

Counting: a LoRA site adds r * (in + out) parameters (plus out with ``bias``);
a ``train`` module makes all its own parameters trainable (each adapter that
trains it keeps its own copy, as PEFT's modules_to_save does). ``total_params``
is the base model's parameters (a tied tensor counted once) plus every adapter
parameter, so ``trainable_percent`` reads as PEFT's ``print_trainable_parameters``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from surgeon.diagnostics import Diagnostic, PlanError
from surgeon.grammar import rules as ir

from surgeon.capture.captured import Captured
from surgeon.methods import method_for, registered_methods, signatures
from surgeon.methods.adapter import SiteContext, SiteProblem
from surgeon.planning.select import resolve

__all__ = ["PlannedSite", "TrainedModule", "RuleReport", "Plan", "build_plan", "PLAN_SCHEMA_VERSION"]

PLAN_SCHEMA_VERSION = 1
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class PlannedSite:
    """One adapter on one module."""

    path: str
    adapter: str
    method: str
    params: dict  # the method's arguments, defaults filled in
    config: Any  # the method's config object
    module_type: str
    kind: str
    in_features: int
    out_features: int
    weight_shape: tuple
    trainable_params: int
    layer: int | None
    rule_line: int | None
    tied_with: tuple = ()
    quantization: str | None = None  # bitsandbytes' storage of the base weight (QLoRA), None: plain
    unroutable: str | None = None  # why adapter_ids cannot route it per batch row; None: planning knows no reason

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "adapter": self.adapter,
            "method": self.method,
            "quantization": self.quantization,
            "params": dict(self.params),
            "module_type": self.module_type,
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight_shape": list(self.weight_shape),
            "trainable_params": self.trainable_params,
            "layer": self.layer,
            "rule_line": self.rule_line,
            "tied_with": list(self.tied_with),
        }


@dataclass(frozen=True)
class TrainedModule:
    """A module whose own parameters train in full (a ``train`` rule won it)."""

    path: str
    adapter: str
    module_type: str
    trainable_params: int
    bytes: int
    rule_line: int | None

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "adapter": self.adapter,
            "module_type": self.module_type,
            "trainable_params": self.trainable_params,
            "rule_line": self.rule_line,
        }


@dataclass(frozen=True)
class RuleReport:
    adapter: str
    index: int
    line: int | None
    text: str
    action: str
    matched: tuple
    won: tuple
    unsupported: tuple  # (path, module type) of won modules the method cannot adapt
    adaptable: tuple = ()  # matched modules the method can adapt (apply rules)

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "index": self.index,
            "line": self.line,
            "text": self.text,
            "action": self.action,
            "matched": list(self.matched),
            "won": list(self.won),
            "unsupported": [{"path": p, "module_type": t} for p, t in self.unsupported],
            "adaptable": list(self.adaptable),
        }


@dataclass
class Plan:
    """What will change: sites, trained modules, per-rule outcomes, totals, warnings."""

    model: str
    model_class: str
    rules_path: str | None
    adapters: tuple
    sites: tuple
    trained: tuple
    rules: tuple
    warnings: tuple
    base_params: int
    checkpoint_dtype: str = "float32"
    capture_seconds: float = 0.0

    @property
    def adapter_params(self) -> int:
        return sum(s.trainable_params for s in self.sites)

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + sum(t.trainable_params for t in self.trained)

    @property
    def total_params(self) -> int:
        return self.base_params + self.adapter_params

    @property
    def adapter_bytes(self) -> int:
        """Bytes of everything a checkpoint of the adapters holds (adapters at checkpoint_dtype)."""
        width = _DTYPE_BYTES.get(self.checkpoint_dtype, 4)
        return self.adapter_params * width + sum(t.bytes for t in self.trained)

    def totals(self) -> dict:
        total = self.total_params
        return {
            "trainable_params": self.trainable_params,
            "adapter_params": self.adapter_params,
            "total_params": total,
            "trainable_percent": round(100.0 * self.trainable_params / total, 6) if total else 0.0,
            "adapter_bytes": self.adapter_bytes,
            "checkpoint_dtype": self.checkpoint_dtype,
            "sites": len(self.sites),
            "trained_modules": len(self.trained),
        }

    def layers(self) -> list:
        """Per-layer coverage: how many sites each adapter has in each numbered layer."""
        rows: dict = {}
        for site in self.sites:
            if site.layer is None:
                continue
            row = rows.setdefault(site.layer, {"layer": site.layer, "sites": 0, "adapters": {}, "modules": []})
            row["sites"] += 1
            row["adapters"][site.adapter] = row["adapters"].get(site.adapter, 0) + 1
            leaf = site.path.rsplit(".", 1)[-1]
            if leaf not in row["modules"]:
                row["modules"].append(leaf)
        return [rows[k] for k in sorted(rows)]

    def to_json(self) -> dict:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model": {"name": self.model, "class": self.model_class, "capture_seconds": round(self.capture_seconds, 3)},
            "rules_file": self.rules_path,
            "adapters": list(self.adapters),
            "sites": [s.to_json() for s in self.sites],
            "trained_modules": [t.to_json() for t in self.trained],
            "rules": [r.to_json() for r in self.rules],
            "totals": self.totals(),
            "layers": self.layers(),
            "warnings": [w.to_json() for w in self.warnings],
            "unroutable_sites": [{"adapter": s.adapter, "path": s.path, "reason": s.unroutable} for s in self.sites if s.unroutable],
        }


def build_plan(rule_set: ir.RuleSet, captured: Captured, methods: dict | None = None, checkpoint_dtype: str = "float32") -> Plan:
    """Resolve ``rule_set`` on ``captured``; raise PlanError listing every error."""
    methods = signatures() if methods is None else methods
    resolution = resolve(rule_set, captured.modules, captured.sites, methods)
    if resolution.errors:
        raise PlanError(resolution.diagnostics)
    model = captured.opened.module
    sites, trained, reports = [], [], []
    problems, chosen_by = [], {}  # (RuleMatch, SiteProblem); (adapter, path) -> the RuleMatch that won it
    for match in resolution.matches:
        rule = match.rule
        line = rule.span.line if rule.span else None
        for path in match.won:
            info = captured.modules[path]
            if match.action == "apply" and path not in match.unsupported:
                site = captured.sites[path]
                config = rule.action.method.config
                method = rule.action.method.name
                sites.append(
                    PlannedSite(
                        path=path,
                        adapter=match.adapter,
                        method=method,
                        params=_arguments(config),
                        config=config,
                        module_type=info.type_name,
                        kind=site.kind,
                        in_features=site.in_features,
                        out_features=site.out_features,
                        weight_shape=site.weight_shape,
                        trainable_params=_trainable_params(config, site),
                        layer=info.layer,
                        rule_line=line,
                        tied_with=site.tied_with,
                        quantization=site.quantization,
                        unroutable=_unroutable(site.kind, method_for(method).adapter_class()),
                    )
                )
                chosen_by[(match.adapter, path)] = match
            elif match.action == "train":
                if info.quantization:
                    problems.append((match, SiteProblem(
                        "quantized-train", f"cannot train {path} of {captured.opened.name} in full: its weight is quantized "
                        f"({info.quantization})", f"adapt it with {' or '.join(_quantized_methods())} instead, or load the "
                        "model unquantized")))
                module = model.get_submodule(path)
                own = {id(p): p for p in module.parameters()}.values()
                trained.append(TrainedModule(path=path, adapter=match.adapter, module_type=info.type_name,
                                             trainable_params=sum(p.numel() for p in own),
                                             bytes=sum(p.numel() * p.element_size() for p in own), rule_line=line))
        reports.append(RuleReport(
            adapter=match.adapter, index=match.index, line=line, text=str(rule), action=match.action,
            matched=tuple(match.matched), won=tuple(match.won),
            unsupported=tuple((p, captured.modules[p].type_name) for p in match.unsupported), adaptable=tuple(match.adaptable)))
    order, declared = ({name: i for i, name in enumerate(names)} for names in (captured.modules, rule_set.adapter_names))
    sites.sort(key=lambda s: (declared[s.adapter], order[s.path]))  # dicts: .index() per site was quadratic
    problems += [(chosen_by[(site.adapter, site.path)], problem) for site, problem in _site_problems(sites, captured)]
    if problems:
        errors = _located(problems, rule_set)
        raise PlanError(sorted(errors + list(resolution.diagnostics), key=lambda d: (d.span.line, d.span.column) if d.span else (0, 0)))
    return Plan(
        model=captured.opened.name,
        model_class=type(model).__name__,
        rules_path=rule_set.path,
        adapters=rule_set.adapter_names,
        sites=tuple(sites),
        trained=tuple(trained),
        rules=tuple(reports),
        warnings=tuple(resolution.diagnostics),
        base_params=captured.total_params,
        checkpoint_dtype=checkpoint_dtype,
        capture_seconds=captured.seconds,
    )


def _arguments(config) -> dict:
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _quantized_methods() -> dict:
    """name -> SiteAdapter class of the methods that adapt a bitsandbytes-quantized linear."""
    classes = {method.name: method.adapter_class() for method in registered_methods()}
    return {name: cls for name, cls in classes.items() if cls is not None and cls.adapts_quantized}


def _unroutable(kind: str, cls) -> str | None:
    if kind == "hf_conv1d":  # the gate needs the batch as the first dimension of the site's output
        return "GPT-2's Conv1D computes on batch and sequence flattened into rows"
    return getattr(cls, "unroutable", None)


def _site_problems(sites: list, captured: Captured) -> list:
    """(site, SiteProblem) for everything compile would refuse about these planned sites: each method's own
    ``validate_site``, a quantized base its method cannot adapt, a site of several weights (MultiheadAttention)
    its method has no adapter for, and a weight two adapters would replace."""
    opened = captured.opened
    model = opened.module
    peers: dict = {}
    for site in sites:
        peers.setdefault((site.adapter, site.method), []).append(site)
    replaced: dict = {}  # one weight tensor (all its names) -> the first site whose method replaces it
    usage = None  # how the methods that adapt quantized linears are used there (hints), found when needed
    found = []
    for site in sites:
        method, source = method_for(site.method), captured.sites[site.path]
        parts = getattr(source, "parts", ())
        cls = method.multi_weight_class() if parts else method.adapter_class()
        if parts and cls is None:
            found.append((site, _no_multi_weight(site)))
            continue
        if cls is None:  # registered without a SiteAdapter: it can be planned, not built
            continue
        if site.quantization is not None and usage is None:
            usage = ", ".join(c.quantized_usage() for c in _quantized_methods().values())
        if site.quantization is not None and not cls.adapts_quantized:
            found.append((site, SiteProblem(
                "quantized-site", f"{site.method} cannot adapt {site.path} of {opened.name}: its weight is quantized "
                f"({site.quantization})", f"on quantized linears use {usage}, or load the model unquantized")))
        try:  # the tensor compile hands the constructor (capture.site_weight)
            weight = model.get_parameter(source.weight)
        except AttributeError:  # a bitsandbytes weight, named by its stand-in buffer
            weight = getattr(model.get_submodule(site.path), "weight", None)
        context = SiteContext(peers=tuple(peers[(site.adapter, site.method)]), weight=weight, model=opened.name,
                              full_precision=opened.full_precision is not None, quantized_methods=usage or "")
        found += [(site, p) for p in cls.validate_site(site, context)]
        if cls.replaces_weight:  # the insert pass can swap a tensor's readers over once
            first = replaced.setdefault(tuple(sorted({source.weight, *site.tied_with})), site)
            if first is not site:
                found.append((site, SiteProblem(
                    "weight-replaced-twice", f"{site.method} of adapter '{site.adapter}' on {site.path} would replace a weight "
                    f"that {first.method} of adapter '{first.adapter}' already replaces ({first.path}, line {first.rule_line})",
                    "one adapter may replace a weight tensor (tied weights are one tensor)"
                    + (f": {cls.replaces_weight_hint}" if cls.replaces_weight_hint else ""))))
    return found


def _no_multi_weight(site) -> SiteProblem:
    """A site whose calls read several weights (a MultiheadAttention's projections), for a method without an adapter
    for such sites."""
    able = [m.name for m in registered_methods() if m.multi_weight is not None]
    what = f"{site.path} ({site.module_type})"
    return SiteProblem("mha-method", f"{site.method} cannot adapt {what}: its projections run inside "
                       f"F.multi_head_attention_forward, where surgeon adapts them with {' and '.join(able)} only (as PEFT does)",
                       f"use {' or '.join(able)} on {site.module_type} modules, or exclude them from this rule")


def _located(problems: list, rule_set) -> list:
    """One diagnostic per rule and code, at the rule, counting the other modules it concerns."""
    groups: dict = {}
    for match, problem in problems:
        groups.setdefault((match.adapter, match.index, problem.code), []).append((match, problem))
    found = []
    for same in groups.values():
        (match, problem), more = same[0], len(same) - 1
        span = match.rule.span
        message = problem.message + (f" (and {more} more module{'s' if more > 1 else ''} this rule won)" if more else "")
        found.append(Diagnostic(problem.code, message, span, problem.hint, file=rule_set.path,
                                source_line=rule_set.source_line(span.line) if span else None))
    return found


def _trainable_params(config, site) -> int:
    """The method's parameters on ``site``; a site of several weights (MultiheadAttention) adapts each of them."""
    if getattr(site, "parts", ()):
        return sum(config.trainable_params(shape[1], shape[0], shape) for _, shape in site.parts)
    return config.trainable_params(site.in_features, site.out_features, site.weight_shape)
