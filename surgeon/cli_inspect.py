"""``surgeon inspect --format json``: what the command line prints for a captured model, as a plain record."""

from __future__ import annotations

__all__ = ["inspect_json"]


def inspect_json(captured, paths) -> dict:
    """The record ``surgeon inspect --format json`` prints: the model, each module in ``paths``, the ties."""
    from surgeon._render import WEIGHT_LAYOUTS

    modules = []
    for path in paths:
        info = captured.modules[path]
        site = captured.sites.get(path)
        modules.append(
            {
                "path": path,
                "type": info.type_name,
                "site": site.kind if site else None,
                "role": info.role,
                "weight_shape": list(info.weight_shape) if info.weight_shape else None,
                "weight_layout": WEIGHT_LAYOUTS.get(site.kind) if site else None,  # Conv1D's is (in, out)
                "params": info.params,
                "layer": info.layer,
                "in_features": info.in_features,
                "out_features": info.out_features,
                "tied_with": list(site.tied_with) if site else [],
                "quantization": info.quantization,
            }
        )
    return {
        "model": {"name": captured.model.name, "class": type(captured.model.module).__name__},
        "modules": modules,
        "ties": [list(g) for g in captured.ties],
        "total_params": captured.total_params,
        "capture_seconds": round(captured.seconds, 3),
        "capture_cached": captured.cached,
    }
