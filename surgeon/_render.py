"""Rich renderables for the command line: built here, printed by the command modules (cli_model.py)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

__all__ = ["inspect_table", "plan_tables", "human_count", "WEIGHT_LAYOUTS"]


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


# Stored shapes read differently per site kind (GPT-2's Conv1D is (in, out), a Linear (out, in)): inspect says which.
WEIGHT_LAYOUTS = {"linear": "out, in", "hf_conv1d": "in, out", "embedding": "rows, dim",
                  "conv1d": "out, in/groups, k", "conv2d": "out, in/groups, kh, kw", "conv3d": "out, in/groups, kd, kh, kw"}


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else ""


def _features(info) -> str:
    return f"{info.in_features} -> {info.out_features}" if info.in_features is not None else ""


def inspect_table(captured, paths) -> Table:
    """The table `surgeon inspect` prints: one row per module of ``paths`` (surgeon.capture.sites.module_table is the data)."""
    table = Table(title=Text(f"{captured.opened.name} ({type(captured.opened.module).__name__})"), title_justify="left")
    table.caption = Text("weight as stored: (out, in) for a Linear, (in, out) for GPT-2's Conv1D")
    table.caption_justify = "left"
    columns = (("path", "left"), ("type", "left"), ("site", "left"), ("role", "left"), ("in -> out", "right"),
               ("weight", "right"), ("params", "right"), ("layer", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name == "path")
    for path in paths:
        info = captured.modules[path]
        site = captured.sites.get(path)
        kind = site.kind if site else ""
        if site and site.tied_with:
            kind += f" (tied: {', '.join(site.tied_with)})"
        layer = "" if info.layer is None else str(info.layer)
        type_name = info.type_name + (f" ({info.quantization})" if info.quantization else "")
        weight = _shape(info.weight_shape) + (" (in, out)" if site and site.kind == "hf_conv1d" else "")
        table.add_row(path, type_name, kind, info.role or "", _features(info), weight, human_count(info.params), layer)
    return table


def _outcome(report, won: int, matched: int) -> str:
    """What a rule got; an apply's modules counted among those its method can adapt."""
    if report.action != "apply":
        return f"won {won} of {matched} matched module{'s' if matched != 1 else ''}"
    adaptable = set(report.adaptable)
    sites = sum(1 for p in report.won if p in adaptable)
    text = f"won {sites} of {len(adaptable)} matched module{'s' if len(adaptable) != 1 else ''} the method can adapt"
    others = matched - len(adaptable)
    if others:
        text += f"; {others} matched module{'s' if others != 1 else ''} it cannot adapt"
        if report.unsupported:
            counts: dict = {}
            for _, type_name in report.unsupported:
                counts[type_name] = counts.get(type_name, 0) + 1
            text += " (not supported: " + ", ".join(f"{n} x{c}" for n, c in counts.items()) + ")"
    return text


def plan_tables(plan) -> list:
    out = []
    header = Text(f"plan: {plan.model} ({plan.model_class})")
    if plan.rules_path:
        header.append(f" with {plan.rules_path}")
    out.append(header)
    sites_by_rule: dict = {}
    for site in plan.sites:
        sites_by_rule.setdefault((site.adapter, site.rule_line), []).append(site)
    trained_by_rule: dict = {}
    for t in plan.trained:
        trained_by_rule.setdefault((t.adapter, t.rule_line), []).append(t)
    for report in plan.rules:
        title = f"line {report.line} [{report.adapter}] {report.text}"
        won, matched = len(report.won), len(report.matched)
        if report.action == "skip":
            out.append(Text(f"{title}\n  skips {won} module{'s' if won != 1 else ''} (matched {matched})"))
            continue
        table = Table(title=Text(title), title_justify="left", show_edge=False)
        table.add_column("module", no_wrap=True)
        table.add_column("type")
        if report.action == "apply":
            table.add_column("in -> out", justify="right")
        table.add_column("trainable", justify="right")
        for site in sites_by_rule.get((report.adapter, report.line), []):
            module_type = site.module_type + (f" ({site.quantization})" if site.quantization else "")
            table.add_row(site.path, module_type, f"{site.in_features} -> {site.out_features}", f"{site.trainable_params:,}")
        for t in trained_by_rule.get((report.adapter, report.line), []):
            table.add_row(t.path, t.module_type, f"{t.trainable_params:,}")
        table.caption = Text(_outcome(report, won, matched))
        table.caption_justify = "left"
        out.append(table)
    totals = plan.totals()
    summary = Table(title="totals", title_justify="left", show_header=False, show_edge=False)
    summary.add_column(justify="left")
    summary.add_column(justify="right")
    summary.add_row("adapter sites", str(totals["sites"]))
    summary.add_row("modules trained in full", str(totals["trained_modules"]))
    summary.add_row("trainable parameters", f"{totals['trainable_params']:,}")
    summary.add_row("all parameters", f"{totals['total_params']:,}")
    summary.add_row("trainable %", f"{totals['trainable_percent']:.4f}")
    summary.add_row(f"adapter checkpoint ({totals['checkpoint_dtype']})", f"{totals['adapter_bytes']:,} bytes")
    out.append(summary)
    reasons: dict = {}
    for site in plan.sites:
        if site.unroutable:
            reasons.setdefault(f"{site.method} on {site.kind}", []).append(site.unroutable)
    if reasons:  # a routed call refuses these when it builds its graph
        listed = "; ".join(f"{len(r)} {what} ({r[0]})" for what, r in reasons.items())
        out.append(Text(f"adapter_ids cannot route {sum(map(len, reasons.values()))} sites: {listed}; set_active() switches them"))
    layers = plan.layers()
    if layers:
        coverage = Table(title="per-layer coverage", title_justify="left", show_edge=False)
        coverage.add_column("layer", justify="right")
        for name in plan.adapters:
            coverage.add_column(name, justify="right")
        coverage.add_column("modules")
        by_layer = {row["layer"]: row for row in layers}
        for layer in range(max(by_layer) + 1):
            row = by_layer.get(layer, {"adapters": {}, "modules": []})
            coverage.add_row(str(layer), *(str(row["adapters"].get(a, 0)) for a in plan.adapters), ", ".join(row["modules"]))
        out.append(coverage)
    return out
