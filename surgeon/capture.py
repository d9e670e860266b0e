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
==============  ===========================================  ==================

Every node knows the module it ran in (``node.meta["nn_module_stack"]``); a
site is a module path with its kind, weight and shapes. Parameters shared
between modules (GPT-2's ``wte`` and ``lm_head``) are reported as tied.
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from surgeon.grammar.diagnostics import ModelError

from .models import OpenedModel

__all__ = ["ModuleInfo", "Site", "Captured", "capture", "export_program", "bind_program", "dynamic_shapes", "widen_inputs", "module_table"]

_TOKEN_INPUTS = ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids", "decoder_input_ids")
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


@dataclass
class Captured:
    """A captured model: its exported program, modules and adaptable sites."""

    model: OpenedModel
    program: Any  # torch.export.ExportedProgram
    modules: dict = field(default_factory=dict)  # path -> ModuleInfo, in module order
    sites: dict = field(default_factory=dict)  # path -> Site
    ties: tuple = ()  # groups of parameter names that share one tensor
    total_params: int = 0
    seconds: float = 0.0
    training: bool = False  # the model's mode when it was captured (export fixes it in the graph)


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
    program = export_program(model, opened.example_args, opened.example_kwargs, opened.is_hugging_face, opened.name)
    captured = Captured(opened, program, training=model.training)
    captured.ties = _ties(model)
    captured.modules = module_table(model)
    captured.sites = _sites(program, captured.modules, captured.ties)
    captured.total_params = _count(model.parameters())
    captured.seconds = time.perf_counter() - started
    return captured


# Exported programs of Hugging Face models, keyed by architecture, config, mode and call
# signature, with their weights replaced by meta tensors (the cache holds no model's
# weights). A program is bound to a model's own tensors with bind_program.
_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()
_PROGRAMS_KEPT = 16


def _program_key(model, args: tuple, kwargs: dict, hugging_face: bool):
    import torch

    config = getattr(model, "config", None)
    if not hugging_face or config is None or not hasattr(config, "to_json_string"):
        return None  # a plain module's forward is not described by anything we can key on
    params = [(n, tuple(p.shape), p.dtype, p.device.type, type(p).__name__) for n, p in model.named_parameters(remove_duplicate=False)]
    if any(kind != "Parameter" for *_, kind in params):
        return None  # fake tensors (planning without weights)

    def signature(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", v.dim(), v.dtype, v.device.type)
        return repr(v)

    return (
        type(model).__qualname__,
        type(model).__module__,
        config.to_json_string(use_diff=False),
        getattr(config, "_attn_implementation", None),
        model.training,
        tuple(params),
        tuple(signature(a) for a in args),
        tuple((k, signature(v)) for k, v in kwargs.items()),
    )


def _template(program):
    """The program with every model tensor on the meta device (shapes and graph only)."""
    import copy

    import torch

    template = copy.copy(program)
    template._state_dict = {
        k: torch.nn.Parameter(v.detach().to("meta"), requires_grad=v.requires_grad) if isinstance(v, torch.nn.Parameter) else v.to("meta")
        for k, v in program.state_dict.items()
    }
    return template


def bind_program(program, model):
    """``program.module()`` running on ``model``'s own parameters and buffers (shared, not copied)."""
    gm = program.module()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        if leaf in owner._parameters:
            setattr(owner, leaf, tensor)
        elif leaf in owner._buffers:
            owner.register_buffer(leaf, tensor)
    stale = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.device.type == "meta"]
    if stale:
        raise ModelError(f"a cached program could not be bound to this model: {', '.join(stale[:3])} has no tensor")
    return gm


def export_program(model, args: tuple, kwargs: dict, hugging_face: bool, name: str):
    """``torch.export.export(strict=False)`` with dynamic batch (and sequence for token inputs).

    Programs of Hugging Face models are cached per architecture, config, mode and call
    signature; use :func:`bind_program` to run one. Failures become a ModelError naming
    the innermost module that was running.
    """
    key = _program_key(model, args, kwargs, hugging_face)
    if key is not None and key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    program = _export(model, args, kwargs, hugging_face, name)
    if key is not None:
        _PROGRAMS[key] = _template(program)
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    return program


def _export(model, args: tuple, kwargs: dict, hugging_face: bool, name: str):
    import torch

    dynamic = dynamic_shapes(args, kwargs, hugging_face)
    # Which modules are running, so that a failure can name the innermost one.
    running: list = []
    paths = {id(m): p for p, m in model.named_modules()}

    def enter(module, args):
        running.append(module)

    def leave(module, args, output):
        if running and running[-1] is module:
            running.pop()

    push = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    pop = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        with _quiet_torch_logs(), _named_keywords(model, kwargs):
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs where and why
        raise _capture_error(model, name, exc, [paths.get(id(m), "?") for m in running]) from None
    finally:
        push.remove()
        pop.remove()


@contextlib.contextmanager
def _named_keywords(model, kwargs: dict):
    """Give keywords that the forward takes through ``**kwargs`` (Trainer's ``num_items_in_batch``)
    a name of their own while exporting: export's dynamic shapes cannot address them otherwise.

    Only the instance's ``forward`` is replaced, so module paths stay as they are.
    """
    import inspect

    signature = inspect.signature(model.forward)
    named = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    has_var_keyword = len(named) < len(signature.parameters)
    extra = [k for k in kwargs if k not in {p.name for p in named}]
    if not extra or not has_var_keyword:
        yield
        return
    original = type(model).forward

    def forward(*args, **kw):
        return original(model, *args, **kw)

    keyword = inspect.Parameter.KEYWORD_ONLY
    forward.__signature__ = signature.replace(parameters=named + [inspect.Parameter(k, keyword, default=None) for k in extra])
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export prints the partial graph to stderr when it fails; surgeon reports
    the failure itself, so that text is dropped (and passed on when export succeeds)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        raise
    else:
        sys.stderr.write(buffer.getvalue())


def dynamic_shapes(args: tuple, kwargs: dict, hugging_face: bool):
    """Batch is dynamic for every tensor input; sequence too for a Hugging Face model's token inputs."""
    import torch
    from torch.export import Dim

    def spec(name, value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        if hugging_face and name in _TOKEN_INPUTS and value.dim() >= 2:
            return {0: Dim.AUTO, 1: Dim.AUTO}
        return {0: Dim.AUTO}

    if kwargs and not args:
        return {k: spec(k, v) for k, v in kwargs.items()}
    if args and not kwargs:
        return tuple(spec(str(i), v) for i, v in enumerate(args))
    return None  # mixed positional and keyword inputs: let export keep the shapes it sees


def widen_inputs(args: tuple, kwargs: dict, hugging_face: bool) -> tuple[tuple, dict]:
    """Copies of the inputs whose dynamic dimensions are at least 2 long.

    export specialises a dimension of size 0 or 1 to a constant; tiling the
    example keeps the captured graph valid for every batch and sequence length.
    """
    import torch

    def widen(name, value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        dims = (0, 1) if hugging_face and name in _TOKEN_INPUTS and value.dim() >= 2 else (0,)
        for d in dims:
            if value.shape[d] < 2:
                value = torch.cat([value] * (2 if value.shape[d] == 1 else 1), dim=d) if value.shape[d] else value
        return value

    return tuple(widen(str(i), v) for i, v in enumerate(args)), {k: widen(k, v) for k, v in kwargs.items()}


def _capture_error(module, name: str, exc: Exception, stack: list) -> ModelError:
    where = ""
    inner = next((p for p in reversed(stack) if p), None)
    if inner is not None:
        where = f" in module '{inner}' ({type(module.get_submodule(inner)).__name__})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = type(exc).__name__
    if "data-dependent" in str(exc) or "DataDependent" in kind or "GuardOnDataDependent" in kind:
        hint = (
            "the module branches on tensor values, which torch.export cannot follow; "
            "rewrite the branch with torch.where or torch.cond, or give it inputs that avoid it"
        )
    else:
        hint = "surgeon captures with torch.export(strict=False); the model's forward must run on the example inputs"
    return ModelError(f"cannot capture {name}{where}: {kind}: {text}", hint=hint)


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
    table = {}
    for path, module in model.named_modules():
        if not path:
            continue
        in_features, out_features, shape = _features(module)
        weight = getattr(module, "weight", None)
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
        )
    return table


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
    import torch

    aten = torch.ops.aten
    conv = {aten.conv1d.default: "conv1d", aten.conv2d.default: "conv2d", aten.conv3d.default: "conv3d"}
    parameters = program.graph_signature.inputs_to_parameters
    tied = {name: group for group in ties for name in group}
    found: dict = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        path = _module_path(node)
        if path is None or path not in modules:
            continue
        info = modules[path]
        if node.target is aten.linear.default:
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
        if name is None:  # a computed weight, not a parameter: nothing to adapt
            continue
        if path in found:
            found[path] = _add_node(found[path], node.name)
            continue
        own = f"{path}.weight"
        if name != own and own in tied.get(name, ()):
            name = own  # export names a tied tensor once; call it by this module's name
        shape = tuple(weight.meta["val"].shape)
        found[path] = Site(
            path=path,
            kind=kind,
            weight=name,
            weight_shape=shape,
            in_features=info.in_features if info.in_features is not None else shape[-1],
            out_features=info.out_features if info.out_features is not None else shape[0],
            nodes=(node.name,),
            tied_with=tuple(n for n in tied.get(name, ()) if n != name),
        )
    return found


def _add_node(site: Site, node: str) -> Site:
    from dataclasses import replace

    return replace(site, nodes=site.nodes + (node,))
