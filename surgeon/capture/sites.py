"""The sites an adapter can go, read off an exported graph; what the language can ask of each module.

:func:`find_sites` reads the training IR that ``export_program`` made (surgeon/capture/export.py),
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
(quantized)      (capture/quantized_bases.py)                 int8 rows of (out, in)
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
from dataclasses import dataclass

import torch

from surgeon.capture.quantized_bases import quantization_of
from surgeon.kernels.quantized import QUANTIZED_OPS

__all__ = ["ModuleInfo", "Site", "module_table", "find_sites", "fits", "tied_parameters", "count_parameters", "site_weight"]

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
    quantization: str | None = None  # bitsandbytes' storage of the weight (surgeon.capture.quantized_bases.Quantization)
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


def _layer(path: str) -> int | None:
    match = _LAYER.search("." + path)
    return int(match.group(1)) if match else None


def count_parameters(parameters) -> int:
    """How many numbers ``parameters`` hold, each shared tensor counted once."""
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
            params=count_parameters(module.parameters()),
            layer=_layer(path),
            depth=path.count(".") + 1,
            in_features=in_features,
            out_features=out_features,
            weight_shape=shape,
            dtype=str(weight.dtype).replace("torch.", "") if hasattr(weight, "dtype") else None,
            quantization=quantization.describe() if quantization is not None else None,
        )
    return table


def fits(site, info) -> bool:
    """Could capture have found ``site`` at the module ``info``? Its kind is the one the module's class computes
    (as _site_reads decides it) and its sizes are the module's own."""
    names = " ".join(info.type_names)
    kinds = {"hf_conv1d": "Conv1D" in info.type_names, "embedding": "Embedding" in names,
             "conv1d": "Conv" in names, "conv2d": "Conv" in names, "conv3d": "Conv" in names,
             "linear": "Embedding" not in names and "Conv1D" not in info.type_names}
    sizes = (info.in_features if info.in_features is not None else site.weight_shape[-1],
             info.out_features if info.out_features is not None else site.weight_shape[0])
    return kinds.get(site.kind, False) and (site.in_features, site.out_features) == sizes


def tied_parameters(model) -> tuple:
    """Groups of parameter names that share one tensor (GPT-2's ``wte.weight`` and ``lm_head.weight``)."""
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


def find_sites(program, modules: dict, ties: tuple) -> dict:
    """path -> Site for every module whose frame in ``program``'s graph runs a site op on one weight (or is a
    MultiheadAttention's packed self-attention); ``modules`` is :func:`module_table`'s, ``ties`` :func:`tied_parameters`'."""
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
    aten = torch.ops.aten
    conv = {aten.conv1d.default: "conv1d", aten.conv2d.default: "conv2d", aten.conv3d.default: "conv3d"}
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
