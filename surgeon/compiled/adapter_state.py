"""Which adapters act, and how adapters are swapped and merged: the part of Compiled that switches.

Every adapter has a gate, one float in ``Compiled.adapter_gates`` that the
graphs read (see passes/insert.py): 1 acts, 0 does not, in between scales it.
Changing gates changes no graph. ``train`` modules follow the gates of the
adapters that train them through the passes at the end of this file.
"""

from __future__ import annotations

import torch
from torch import nn

from surgeon.passes._graph import attribute
from surgeon.passes.insert import GATES_BUFFER

__all__ = ["AdapterSwitching", "gate_trained_modules", "fold_trained_modules", "site_key"]


def site_key(path: str) -> str:
    """A module path as a ModuleDict key (dots are not allowed there)."""
    return path.replace(".", "__")


class AdapterSwitching:
    """Mixed into :class:`surgeon.compiled.model.Compiled`."""

    def _forget_gate(self, name: str) -> None:
        """Drop ``name``'s gate (it starts afresh when rebuilt), keeping every other adapter's."""
        kept = {n: g for n, g in zip(self._gate_names, self.adapter_gates.tolist()) if n != name}
        self.__dict__["_gate_names"] = tuple(kept)
        self.adapter_gates = torch.tensor(list(kept.values()), dtype=torch.float32, device=self.adapter_gates.device)

    def _sync_gates(self) -> None:
        """One gate per adapter name, in ``adapter_names`` order; new adapters start active."""
        old = dict(zip(getattr(self, "_gate_names", ()), self.adapter_gates.tolist()))
        names = self.adapter_names
        self.__dict__["_gate_names"] = names
        self.adapter_gates = torch.tensor([old.get(n, 1.0) for n in names], dtype=torch.float32, device=self.adapter_gates.device)

    def swap_adapter(self, name: str, directory) -> None:
        """Replace adapter ``name``'s LoRA weights by those of the PEFT adapter in ``directory``, in place.

        No graph is captured again and a ``torch.compile``d model is not
        recompiled: smaller ranks are zero-padded and scales folded into B (see
        surgeon/checkpoints/hot_swap.py); a larger rank is an error naming the rank to compile for.
        """
        from surgeon.checkpoints.program import lora_sites
        from surgeon.checkpoints.hot_swap import swapped_factors

        sites = lora_sites(self).get(name, {})
        others = [s.path for s in self.plan.sites if s.adapter == name and s.path not in sites]
        if not sites or others:
            from surgeon.diagnostics import SurgeryError

            raise SurgeryError(f"adapter {name!r} is not made of plain LoRA on linear layers only, which a swap needs"
                               + (f" ({others[0]})" if others else ""), hint="load_adapter() replaces any adapter (a new graph)")
        with torch.no_grad():
            for path, (a, b) in swapped_factors(sites, directory).items():
                module = self.adapter_module(name, path)
                module.lora_A.copy_(a)
                module.lora_B.copy_(b)

    def merge(self, name: str, sources: dict, combination: str = "linear", *, replace: bool = False, **options) -> str:
        """A new adapter ``name``: ``combination`` of ``sources`` (name -> weight), as PEFT's
        ``add_weighted_adapter`` (``density``, ``majority_sign``, ``svd_rank``, ``svd_clamp``;
        see surgeon/compiled/merge_math.py for each type's math; ``linear`` is exact, without PEFT's cross terms)."""
        from surgeon.compiled.merge import merge_adapters

        return merge_adapters(self, name, sources, combination, replace=replace, **options)

    @property
    def active_adapters(self) -> tuple:
        return tuple(n for n, g in zip(self.adapter_names, self.adapter_gates.tolist()) if g != 0)

    def set_active(self, names=None, weights=None) -> None:
        """Make ``names`` (one, several, or None for none) the adapters that act, without a new graph.

        ``weights`` gives each active adapter its own strength (default 1).
        The others stop acting, and in training stop training too: their
        parameters get ``requires_grad=False``, as PEFT's ``set_adapter`` does
        (in eval mode that waits for ``.train()``, so that switching adapters
        while serving a ``torch.compile``d model changes tensors only and never
        recompiles).
        """
        names = [names] if isinstance(names, str) else list(names or ())
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            from surgeon.diagnostics import SurgeryError

            raise SurgeryError(f"no adapter named {', '.join(map(repr, unknown))}", hint=f"adapters: {', '.join(self.adapter_names)}")
        if weights is not None and len(list(weights)) != len(names):
            from surgeon.diagnostics import SurgeryError

            raise SurgeryError(f"set_active got {len(names)} adapters and {len(list(weights))} weights", hint="one weight per adapter")
        weights = dict(zip(names, weights)) if weights is not None else {n: 1.0 for n in names}
        self.set_gates(weights)
        if self.training:
            self._train_active_only()

    def _train_active_only(self) -> None:
        """requires_grad on the parameters of active adapters (and of modules they train) only."""
        active = set(self.active_adapters)
        for name in self.adapter_names:
            for p in (self.adapters[name].parameters() if name in self.adapters else ()):
                p.requires_grad_(name in active)
        for t_path in {t.path for t in self.plan.trained}:
            owners = {t.adapter for t in self.plan.trained if t.path == t_path}
            for p in self.trained[site_key(t_path)].parameters():
                p.requires_grad_(bool(owners & active))

    def train(self, mode: bool = True):
        result = super().train(mode)
        if mode:
            self._train_active_only()
        return result

    def disabled(self):
        """``with compiled.disabled():`` runs the base model (every gate 0), then restores the gates."""
        import contextlib

        @contextlib.contextmanager
        def context():
            saved = self.adapter_gates.clone()
            with torch.no_grad():
                self.adapter_gates.zero_()
            try:
                yield self
            finally:
                with torch.no_grad():
                    self.adapter_gates.copy_(saved)

        return context()

    def _checked_ids(self, ids, args=(), kwargs=None):
        kwargs = {k: v for k, v in (kwargs or {}).items() if k != "adapter_ids"}
        from surgeon.diagnostics import SurgeryError

        ids = torch.as_tensor(ids, device=self.adapter_gates.device)  # on the model's device
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise SurgeryError(f"adapter_ids must be a 1-D integer tensor (one id per batch row), not {tuple(ids.shape)} {ids.dtype}")
        batch = next((t.shape[0] for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if batch is not None and ids.shape[0] != batch:
            raise SurgeryError(f"adapter_ids has {ids.shape[0]} ids for a batch of {batch} rows", hint="one id per batch row (-1: none)")
        if not torch.compiler.is_compiling() and ids.numel() and (ids.min() < -1 or ids.max() >= len(self.adapter_names)):
            raise SurgeryError(
                f"adapter_ids holds {int(ids.min())}..{int(ids.max())}; ids are -1 (no adapter) or 0..{len(self.adapter_names) - 1}",
                hint="adapters: " + ", ".join(f"{i}={n}" for i, n in enumerate(self.adapter_names)),
            )
        return ids

    def _fold_weights(self, adapters: dict | None) -> dict:
        if adapters is None:
            return dict(zip(self.adapter_names, self.adapter_gates.tolist()))
        unknown = [n for n in adapters if n not in self.adapter_names]
        if unknown:
            from surgeon.diagnostics import SurgeryError

            raise SurgeryError(f"no adapter named {', '.join(map(repr, unknown))}", hint=f"adapters: {', '.join(self.adapter_names)}")
        return {n: float(adapters.get(n, 0.0)) for n in self.adapter_names}

    def set_gates(self, weights: dict) -> None:
        """Set each adapter's gate (name -> strength; absent names 0), leaving requires_grad alone."""
        with torch.no_grad():
            self.adapter_gates.copy_(torch.tensor([float(weights.get(n, 0.0)) for n in self.adapter_names]))


def gate_trained_modules(compiled):
    """A pass: the graph reads each trained copy's parameter as lerp(base, copy, g) (exact at g = 0 and 1),
    g = the largest gate among the adapters that train the module, so switching adapters switches them too."""
    from surgeon.passes import PassResult

    def gate_trained_module_parameters(gm) -> PassResult:
        if not compiled.plan.trained:
            return PassResult(gm, False)
        aten = torch.ops.aten
        graph = gm.graph
        gates = next(n for n in graph.nodes if n.op == "get_attr" and n.target == GATES_BUFFER)
        index = {n: i for i, n in enumerate(compiled.adapter_names)}
        for t_path in dict.fromkeys(t.path for t in compiled.plan.trained):
            owners = [index[t.adapter] for t in compiled.plan.trained if t.path == t_path]
            module = compiled.trained[site_key(t_path)]
            for name, _ in module.named_parameters():
                target = f"{t_path}.{name}"
                base_target = f"{t_path}.surgeon_base__{name.replace('.', '__')}"
                owner_path, _, leaf = base_target.rpartition(".")
                gm.get_submodule(owner_path).register_buffer(leaf, compiled.base_model.get_parameter(target))
                dtype = compiled.base_model.get_parameter(target).dtype
                for node in [n for n in graph.nodes if n.op == "get_attr" and n.target == target and n.users]:
                    made = []
                    order = {n: i for i, n in enumerate(graph.nodes)}
                    first_user = min(node.users, key=order.__getitem__)  # after the gates, before any use

                    def add(op, args, kwargs=None):
                        with graph.inserting_before(first_user):
                            made.append(graph.call_function(op, args, kwargs or {}) if op else graph.get_attr(args))
                        return made[-1]

                    base = add(None, base_target)
                    gate = add(aten.select.int, (gates, 0, owners[0]))
                    for i in owners[1:]:  # several adapters train this module: it acts when any does
                        gate = add(aten.maximum.default, (gate, add(aten.select.int, (gates, 0, i))))
                    gate = add(aten._to_copy.default, (gate,), {"dtype": dtype})
                    mixed = add(aten.lerp.Tensor, (base, node, gate))
                    node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
                    for n in made:
                        n.meta["surgeon"] = {"adapter": None, "site": t_path, "method": "train", "role": "trained"}
        return PassResult(gm, True)

    return gate_trained_module_parameters


def fold_trained_modules(compiled, weights: dict, merged: dict | None = None):
    """A pass: each gated parameter of a trained module becomes one tensor, lerp(base, copy, w), read under the
    parameter's own name. ``merged`` keeps those tensors (("trained", name) -> tensor) as fold_adapters keeps the
    sites': a copy of the trained parameter, so that the folded graph does not change when training goes on."""
    from surgeon.passes import PassResult

    merged = {} if merged is None else merged

    def fold_trained_module_parameters(gm) -> PassResult:
        aten = torch.ops.aten
        changed = False
        for node in list(gm.graph.nodes):
            record = node.meta.get("surgeon", {})
            if record.get("role") != "trained" or node.target is not aten.lerp.Tensor:
                continue
            base_node, copy_node = node.args[0], node.args[1]
            key = ("trained", copy_node.target)
            if key not in merged:
                owners = {t.adapter for t in compiled.plan.trained if t.path == record["site"]}
                w = max(weights.get(a, 0.0) for a in owners)
                base, trained = attribute(gm, base_node.target), attribute(gm, copy_node.target).detach()
                with torch.no_grad():
                    merged[key] = base if w == 0 else nn.Parameter(trained.clone() if w == 1 else torch.lerp(base, trained, w),
                                                                  requires_grad=False)
            owner_path, _, leaf = copy_node.target.rpartition(".")
            setattr(gm.get_submodule(owner_path), leaf, merged[key])  # the folded module's own tree (copy_graph_module)
            node.replace_all_uses_with(copy_node)
            changed = True
        for node in reversed(list(gm.graph.nodes)):  # the gating nodes, and the base copies they read
            if node.meta.get("surgeon", {}).get("role") == "trained" and not node.users:
                gm.graph.erase_node(node)
        for name, module in list(gm.named_modules()):
            for leaf in [a for a in (*module._buffers, *module._parameters) if a.startswith("surgeon_base__")]:
                if not any(n.op == "get_attr" and n.target == f"{name}.{leaf}".lstrip(".") for n in gm.graph.nodes):
                    delattr(module, leaf)
        return PassResult(gm, changed)

    return fold_trained_module_parameters
