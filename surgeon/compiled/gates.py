"""Which adapters act, and how much: the gates, on plain data (adapter names and the gates tensor).

Every adapter has a gate, one float32 in ``Compiled.adapter_gates`` that the
graphs read (passes/insert.py): 1 acts, 0 does not, in between scales it;
``gates[i]`` belongs to ``adapter_names[i]``. Changing gates changes no graph.
A routed call (``adapter_ids``, one id per batch row) runs each row with the
adapter of that index instead. ``train`` modules follow the gates of the
adapters that train them (trained_modules.py).
"""

from __future__ import annotations

import contextlib

import torch

from surgeon.diagnostics import SurgeryError

from surgeon.compiled.building import site_key

__all__ = ["gates_for", "gate_values", "active_names", "selected_weights", "fold_weights", "checked_ids", "gates_zeroed",
           "train_active_only"]


def gates_for(names, kept: dict, device=None) -> torch.Tensor:
    """One float32 gate per name of ``names``, in order: ``kept[name]`` where given, else 1 (a new adapter acts)."""
    return torch.tensor([float(kept.get(n, 1.0)) for n in names], dtype=torch.float32, device=device)


def gate_values(names, gates: torch.Tensor) -> dict:
    """adapter name -> its gate."""
    return dict(zip(names, gates.tolist()))


def active_names(names, gates: torch.Tensor) -> tuple:
    """The adapters whose gate is not 0, in order."""
    return tuple(n for n, g in zip(names, gates.tolist()) if g != 0)


def _refuse_unknown(asked, names) -> None:
    unknown = [n for n in asked if n not in names]
    if unknown:
        raise SurgeryError(f"no adapter named {', '.join(map(repr, unknown))}", hint=f"adapters: {', '.join(names)}")


def selected_weights(names, selected=None, weights=None) -> dict:
    """name -> strength for ``set_active(selected, weights)``: one name, several, or None (none); weights default 1."""
    selected = [selected] if isinstance(selected, str) else list(selected or ())
    _refuse_unknown(selected, names)
    if weights is not None and len(list(weights)) != len(selected):
        raise SurgeryError(f"set_active got {len(selected)} adapters and {len(list(weights))} weights", hint="one weight per adapter")
    return dict(zip(selected, weights)) if weights is not None else {n: 1.0 for n in selected}


def fold_weights(names, gates: torch.Tensor, adapters: dict | None) -> dict:
    """name -> the strength a fold gives it: ``adapters`` (absent names 0), or the gates when None."""
    if adapters is None:
        return gate_values(names, gates)
    _refuse_unknown(adapters, names)
    return {n: float(adapters.get(n, 0.0)) for n in names}


def checked_ids(ids, names, device, args=(), kwargs=None) -> torch.Tensor:
    """``adapter_ids`` as a 1-D integer tensor on ``device``, one id per batch row of the call's inputs, each
    -1 (no adapter) or an index into ``names``; else a SurgeryError saying which."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "adapter_ids"}
    ids = torch.as_tensor(ids, device=device)
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
        raise SurgeryError(f"adapter_ids must be a 1-D integer tensor (one id per batch row), not {tuple(ids.shape)} {ids.dtype}")
    batch = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    if batch is not None and ids.shape[0] != batch:
        raise SurgeryError(f"adapter_ids has {ids.shape[0]} ids for a batch of {batch} rows", hint="one id per batch row (-1: none)")
    if not torch.compiler.is_compiling() and ids.numel() and (ids.min() < -1 or ids.max() >= len(names)):
        raise SurgeryError(
            f"adapter_ids holds {int(ids.min())}..{int(ids.max())}; ids are -1 (no adapter) or 0..{len(names) - 1}",
            hint="adapters: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)),
        )
    return ids


@contextlib.contextmanager
def gates_zeroed(gates: torch.Tensor):
    """Every gate 0 in the body (the base model runs), then the gates as they were."""
    saved = gates.clone()
    with torch.no_grad():
        gates.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            gates.copy_(saved)


def train_active_only(adapters, trained, plan, active) -> None:
    """requires_grad on the parameters of the ``active`` adapters (of ``adapters``: name -> site modules) and of
    the trained copies (``trained``: site key -> module) they train, off on every other's (PEFT's set_adapter)."""
    active = set(active)
    for name in adapters:
        for p in adapters[name].parameters():
            p.requires_grad_(name in active)
    for path in {t.path for t in plan.trained}:
        owners = {t.adapter for t in plan.trained if t.path == path}
        for p in trained[site_key(path)].parameters():
            p.requires_grad_(bool(owners & active))

