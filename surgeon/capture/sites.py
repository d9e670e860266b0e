"""Capture a model as a graph, and find the sites an adapter can go.

``capture(opened)`` runs ``torch.export.export(..., strict=False)`` with dynamic
batch (and, for token inputs, sequence) dimensions, then reads the training IR
before any decomposition, where linears are still ``aten.linear``:

==============  ===========================================  ==================
site kind        graph node                                   weight layout
==============  ===========================================  ==================
linear           ``aten.linear(x, W[, b])``                   W: (out, in)
hf_conv1d        ``aten.addmm(b, x, W)`` in transformers'     W: (in, out)
                 ``Conv1D`` (GPT-2)
embedding        ``aten.embedding(W, ids)``                   W: (vocab, dim)
conv1d/2d/3d     ``aten.convNd(x, W, ...)``                   W: (out, in/groups, *k)
linear           ``surgeon.linear_4bit`` / ``linear_8bit``    bitsandbytes 4-bit blocks /
(quantized)      (kernels/quantized.py)                       int8 rows of (out, in)
==============  ===========================================  ==================

Every node knows the module it ran in (``node.meta["nn_module_stack"]``); a
site is a module path with its kind, weight and shapes. Parameters shared
between modules (GPT-2's ``wte`` and ``lm_head``) are reported as tied.

A site reads one weight: a module whose own frame runs site ops on several
parameters is no site (an adapter sized for one would meet the others), but
for ``nn.MultiheadAttention``. Its forward calls ``F.multi_head_attention_forward``,
which runs the packed in-projection (``in_proj_weight``, (3E, E)) and
``out_proj.weight`` (E, E) in the MHA's frame: one site at the MHA's path, as
PEFT's ``target_modules=["attn"]`` adapts both. Its ``weight`` is the
in-projection; ``parts`` names both weights, in-projection first. A
cross-attention MHA (query is not key) slices the packed weight, and one with
separate q/k/v weights has no packed one: neither is a site (PEFT refuses the
latter too).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from surgeon.diagnostics import ModelError

from surgeon.capture.cache import capture_key, load_capture, store_capture
from surgeon.capture.export import cached_program, export_program
from surgeon.capture.models import OpenedModel

__all__ = ["ModuleInfo", "Site", "Captured", "capture", "module_table", "site_weight"]

_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ModuleInfo:
    """What the rules language can ask of a module (see grammar/vocabulary.py)."""

    path: str
    type_name: str
    type_names: tuple  # the class and its bases, so type(Linear) matches subclasses too
    params: int  # its parameters and its children's, each shared tensor counted once
    layer: int | None
    depth: int
    in_features: int | None = None
    out_features: int | None = None
    weight_shape: tuple | None = None
    dtype: str | None = None
    quantization: str | None = None  # bitsandbytes' storage of the weight (surgeon.kernels.quantized.Quantization)
    role: str | None = None  # what it does, from the dataflow (surgeon/capture/roles.py): sites and norms; "unknown" if undecided

    def field(self, name: str):
        return getattr(self, name)


@dataclass(frozen=True)
class Site:
    """A place in the graph where an adapter can go."""

    path: str
    kind: str  # one of surgeon.methods.SITE_KINDS
    weight: str  # the weight parameter's name
    weight_shape: tuple
    in_features: int
    out_features: int
    nodes: tuple  # names of the graph nodes that compute it (a module called twice has two)
    tied_with: tuple = ()  # other names of the same weight tensor
    quantization: str | None = None  # how bitsandbytes stores the weight; None: a plain tensor
    # A site computing several linears (MultiheadAttention): ((weight name, weight shape), ...), the site's own
    # ``weight`` first; () for a site of one weight.
    parts: tuple = ()


@dataclass
class Captured:
    """A captured model: its exported program, modules and adaptable sites."""

    model: OpenedModel
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
            opened = self.model
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
    if found is not None and not all(_fits(site, modules[path]) for path, site in found[0].items()):
        found = None  # a cached site this model's module could not have: capture again (and rewrite the file)
    program = cached_program(model, opened.example_args, opened.example_kwargs, opened.is_hugging_face)
    if program is None and found is None:
        # A model of fake tensors is planned, never run: its program needs no dynamic sizes.
        program = export_program(model, opened.example_args, opened.example_kwargs, opened.is_hugging_face, opened.name,
                                 dynamic=not opened.fake)
    captured = Captured(opened, program, training=model.training, cached=found is not None)
    captured.ties = _ties(model)
    captured.modules = modules
    if found is not None:  # no export (program None) unless this process holds one already
        sites, roles = found
        # How bitsandbytes stores a weight is read from the live model, not the file.
        captured.sites = {path: replace(site, quantization=captured.modules[path].quantization) if path in captured.modules else site
                          for path, site in sites.items()}
        captured.modules = {path: replace(info, role=roles[path]) if path in roles else info
                            for path, info in captured.modules.items()}
    else:
        captured.sites = _sites(program, captured.modules, captured.ties)
        captured.modules, understood = _with_roles(program, captured.modules, captured.sites)
        if understood:  # a role analysis that failed here is not kept for later processes
            store_capture(key, captured)
    captured.total_params = _count(model.parameters())
    captured.seconds = time.perf_counter() - started
    return captured


def _with_roles(program, modules: dict, sites: dict) -> tuple[dict, bool]:
    """(modules with their roles, whether the analysis read the graph)."""
    from surgeon.capture.roles import norm_modules, site_roles

    understood = True
    try:
        roles = site_roles(program, sites)
        roles.update({path: "norm" for path in norm_modules(program, modules) if path not in roles})
    except Exception as exc:  # roles only serve role(...) rules and inspect: a graph they misread must not stop capture
        import warnings

        warnings.warn(f"the role analysis could not read this graph ({type(exc).__name__}: {exc}); every site's role is unknown",
                      stacklevel=2)
        roles, understood = {path: "unknown" for path in sites}, False
    return {path: replace(info, role=roles[path]) if path in roles else info for path, info in modules.items()}, understood


def _layer(path: str) -> int | None:
    match = _LAYER.search("." + path)
    return int(match.group(1)) if match else None


def _count(parameters) -> int:
    seen, total = set(), 0
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _features(module) -> tuple:
    """(in_features, out_features, weight shape) as the language defines them."""
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if weight is not None and hasattr(weight, "shape") else None
    names = {c.__name__ for c in type(module).__mro__}
    if "Linear" in names and hasattr(module, "in_features"):
        return module.in_features, module.out_features, shape
    if "Conv1D" in names and shape is not None and len(shape) == 2:  # transformers' Conv1D: (in, out)
        return shape[0], shape[1], shape
    if hasattr(module, "in_channels") and hasattr(module, "out_channels"):
        return module.in_channels, module.out_channels, shape
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return module.num_embeddings, module.embedding_dim, shape
    return None, None, shape


def module_table(model) -> dict:
    """path -> ModuleInfo for every module but the root, in ``named_modules`` order."""
    from surgeon.kernels.quantized import quantization_of

    table = {}
    for path, module in model.named_modules():
        if not path:
            continue
        in_features, out_features, shape = _features(module)
        weight = getattr(module, "weight", None)
        quantization = quantization_of(module)
        if quantization is not None:  # the stored tensor is packed; the language speaks of the (out, in) weight
            shape = (out_features, in_features)
        table[path] = ModuleInfo(
            path=path,
            type_name=type(module).__name__,
            type_names=tuple(c.__name__ for c in type(module).__mro__ if c.__name__ not in ("Module", "object")),
            params=_count(module.parameters()),
            layer=_layer(path),
            depth=path.count(".") + 1,
            in_features=in_features,
            out_features=out_features,
            weight_shape=shape,
            dtype=str(weight.dtype).replace("torch.", "") if hasattr(weight, "dtype") else None,
            quantization=quantization.describe() if quantization is not None else None,
        )
    return table


def _fits(site, info) -> bool:
    """Could capture have found ``site`` at the module ``info``? Its kind is the one the module's class computes
    (as _site_reads decides it) and its sizes are the module's own."""
    names = " ".join(info.type_names)
    kinds = {"hf_conv1d": "Conv1D" in info.type_names, "embedding": "Embedding" in names,
             "conv1d": "Conv" in names, "conv2d": "Conv" in names, "conv3d": "Conv" in names,
             "linear": "Embedding" not in names and "Conv1D" not in info.type_names}
    sizes = (info.in_features if info.in_features is not None else site.weight_shape[-1],
             info.out_features if info.out_features is not None else site.weight_shape[0])
    return kinds.get(site.kind, False) and (site.in_features, site.out_features) == sizes


def _ties(model) -> tuple:
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return tuple(tuple(group) for group in names.values() if len(group) > 1)


def _module_path(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _sites(program, modules: dict, ties: tuple) -> dict:
    reads = _site_reads(program, modules)
    tied = {name: group for group in ties for name in group}
    found: dict = {}
    for path, calls in reads.items():
        info = modules[path]
        parts = ()
        if "MultiheadAttention" in info.type_names:
            parts = _mha_parts(path, calls)
            if not parts:  # cross-attention (a sliced packed weight) or separate q/k/v weights: not a site
                continue
        else:
            calls = [call for call in calls if call[2] is not None]  # a computed weight: nothing to adapt
            if not calls or len({name for _, _, name, _ in calls}) > 1:
                continue  # several weights in one frame: an adapter sized for one would meet the others
        _, kind, name, shape = calls[0]
        own = f"{path}.weight"
        if name != own and own in tied.get(name, ()):
            name = own  # export names a tied tensor once; call it by this module's name
        found[path] = Site(
            path=path,
            kind=kind,
            weight=name,
            weight_shape=shape,
            in_features=info.in_features if info.in_features is not None else shape[-1],
            out_features=info.out_features if info.out_features is not None else shape[0],
            nodes=tuple(node for node, *_ in calls),
            tied_with=tuple(n for n in tied.get(name, ()) if n != name),
            quantization=info.quantization,
            parts=parts,
        )
    return found


def _site_reads(program, modules: dict) -> dict:
    """path -> [(node name, kind, weight parameter name, weight shape)] of the site ops each module's frame runs."""
    import torch

    aten = torch.ops.aten
    conv = {aten.conv1d.default: "conv1d", aten.conv2d.default: "conv2d", aten.conv3d.default: "conv3d"}
    from surgeon.kernels.quantized import QUANTIZED_OPS

    parameters = program.graph_signature.inputs_to_parameters
    buffers = program.graph_signature.inputs_to_buffers  # a quantized weight is its stand-in's buffer
    reads: dict = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        path = _module_path(node)
        if path is None or path not in modules:
            continue
        info = modules[path]
        if node.target is aten.linear.default or (node.target in QUANTIZED_OPS and info.quantization):
            kind, weight = "linear", node.args[1]
        elif node.target is aten.addmm.default and "Conv1D" in info.type_names:
            kind, weight = "hf_conv1d", node.args[2]
        elif node.target is aten.embedding.default:
            kind, weight = "embedding", node.args[0]
        elif node.target in conv:
            kind, weight = conv[node.target], node.args[1]
        else:
            continue
        name = parameters.get(getattr(weight, "name", None))
        if node.target in QUANTIZED_OPS:
            name = buffers.get(getattr(weight, "name", None))
        if name is None:  # a computed weight, not a parameter (kept: a MultiheadAttention slicing its weight is no site)
            reads.setdefault(path, []).append((node.name, kind, None, None))
            continue
        shape = tuple(weight.meta["val"].shape) if not info.quantization else info.weight_shape
        reads.setdefault(path, []).append((node.name, kind, name, shape))
    return reads


def _mha_parts(path: str, calls: list) -> tuple:
    """((in_proj_weight, shape), (out_proj.weight, shape)) when ``calls`` are a MultiheadAttention's packed
    self-attention projections (linears on exactly those two parameters, the in-projection first), else ()."""
    packed, out = f"{path}.in_proj_weight", f"{path}.out_proj.weight"
    if any(kind != "linear" for _, kind, _, _ in calls) or calls[0][2] != packed:
        return ()
    shapes = {name: shape for _, _, name, shape in calls}
    if set(shapes) != {packed, out}:
        return ()
    return ((packed, shapes[packed]), (out, shapes[out]))


def site_weight(model, site: Site):
    """The tensor ``site`` reads as its weight in ``model``: the parameter it names (MultiheadAttention's
    ``in_proj_weight``), else its module's ``weight`` (a bitsandbytes weight, named by its stand-in)."""
    try:
        return model.get_parameter(site.weight)
    except AttributeError:
        return model.get_submodule(site.path).weight
