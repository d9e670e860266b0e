"""``capture(opened) -> Captured``: a model exported, its sites found and their roles read, once per architecture.

The floor's one entry point. It puts together what the other modules of this
folder do: ``export`` traces the model (or reuses a program of the same
architecture), ``sites`` reads the adaptable sites off the graph, ``roles``
reads what each does from the dataflow, and ``cache`` keeps sites and roles on
disk, so that the next process of the same architecture skips the export
(``Captured.cached``; the program is then exported on first use).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from surgeon.capture.cache import capture_key, load_capture, store_capture
from surgeon.capture.export import cached_program, export_program
from surgeon.capture.models import OpenedModel
from surgeon.capture.roles import UNKNOWN, norm_modules, site_roles
from surgeon.capture.sites import count_parameters, find_sites, fits, module_table, tied_parameters
from surgeon.diagnostics import ModelError

__all__ = ["Captured", "capture"]


@dataclass
class Captured:
    """A captured model: the model it was opened as, its exported program, modules and adaptable sites."""

    opened: OpenedModel
    _program: Any = field(default=None, repr=False)  # torch.export.ExportedProgram (see ``program``)
    modules: dict = field(default_factory=dict)  # path -> ModuleInfo, in module order
    sites: dict = field(default_factory=dict)  # path -> Site
    ties: tuple = ()  # groups of parameter names that share one tensor
    total_params: int = 0
    seconds: float = 0.0
    training: bool = False  # the model's mode when it was captured (export fixes it in the graph)
    cached: bool = False  # sites and roles came from the capture cache (surgeon/capture/cache.py)
    _released: bool = field(default=False, repr=False)

    @property
    def program(self):
        """The exported program. After a capture-cache hit it is exported on first use (and kept)."""
        if self._program is None and self.cached and not self._released:
            opened = self.opened
            self._program = export_program(opened.module, opened.example_args, opened.example_kwargs,
                                           opened.is_hugging_face, opened.name, dynamic=not opened.fake)
        return self._program

    @program.setter
    def program(self, value) -> None:  # None: let go of it (a compiled model took it for its first graph)
        self._program, self._released = value, value is None


def capture(opened: OpenedModel) -> Captured:
    """Export ``opened`` and classify its sites. Raises ModelError saying where capture failed."""
    model = opened.module
    if not opened.example_args and not opened.example_kwargs:
        raise ModelError(
            f"cannot capture {opened.name}: no example inputs",
            hint="pass example_inputs= (a tuple of arguments or a dict of keyword arguments), "
            "or return (module, example_inputs) from your factory",
        )
    started = time.perf_counter()
    key = capture_key(opened)
    modules = module_table(model)
    found = load_capture(key, model)  # sites and roles, when any process captured this architecture before
    if found is not None and not all(fits(site, modules[path]) for path, site in found[0].items()):
        found = None  # a cached site this model's module could not have: capture again (and rewrite the file)
    program = cached_program(model, opened.example_args, opened.example_kwargs, opened.is_hugging_face)
    if program is None and found is None:
        # A model of fake tensors is planned, never run: its program needs no dynamic sizes.
        program = export_program(model, opened.example_args, opened.example_kwargs, opened.is_hugging_face, opened.name,
                                 dynamic=not opened.fake)
    captured = Captured(opened, program, training=model.training, cached=found is not None)
    captured.ties = tied_parameters(model)
    captured.modules = modules
    if found is not None:  # no export (program None) unless this process holds one already
        sites, roles = found
        # How bitsandbytes stores a weight is read from the live model, not the file.
        captured.sites = {path: replace(site, quantization=captured.modules[path].quantization) if path in captured.modules else site
                          for path, site in sites.items()}
        captured.modules = {path: replace(info, role=roles[path]) if path in roles else info
                            for path, info in captured.modules.items()}
    else:
        captured.sites = find_sites(program, captured.modules, captured.ties)
        captured.modules, understood = _with_roles(program, captured.modules, captured.sites)
        if understood:  # a role analysis that failed here is not kept for later processes
            store_capture(key, captured)
    captured.total_params = count_parameters(model.parameters())
    captured.seconds = time.perf_counter() - started
    return captured


def _with_roles(program, modules: dict, sites: dict) -> tuple[dict, bool]:
    """(modules with their roles, whether the analysis read the graph)."""
    understood = True
    try:
        roles = site_roles(program, sites)
        roles.update({path: "norm" for path in norm_modules(program, modules) if path not in roles})
    except Exception as exc:  # roles only serve role(...) rules and inspect: a graph they misread must not stop capture
        warnings.warn(f"the role analysis could not read this graph ({type(exc).__name__}: {exc}); every site's role is unknown",
                      stacklevel=2)
        roles, understood = {path: UNKNOWN for path in sites}, False
    return {path: replace(info, role=roles[path]) if path in roles else info for path, info in modules.items()}, understood
