"""Export a model with torch.export, and keep what was exported.

``export_program`` runs ``torch.export.export(..., strict=False)`` with a dynamic
batch dimension (and sequence, for a Hugging Face model's token inputs). A
failure becomes a ModelError naming the innermost module that was running.

Programs of Hugging Face models are cached per architecture, config, training
mode and call signature, with their weights replaced by meta tensors, so the
cache holds no model's weights; ``bind_program`` makes a runnable graph module
of a program that uses a given model's own parameters and buffers (shared, not
copied). Exporting the same architecture again then costs nothing.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import io
import sys

import torch
from torch.export import Dim

from surgeon.capture.quantized_bases import quantized_stand_ins
from surgeon.diagnostics import ModelError

__all__ = ["autocast_state", "export_program", "cached_program", "bind_program", "dynamic_shapes", "widen_inputs", "TOKEN_INPUTS"]

# Inputs whose first two dimensions are batch and sequence.
TOKEN_INPUTS = ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids", "decoder_input_ids")


# Exported programs of Hugging Face models, keyed by architecture, config, mode and call
# signature, with their weights replaced by meta tensors (the cache holds no model's
# weights). A program is bound to a model's own tensors with bind_program.
_PROGRAMS: "collections.OrderedDict" = collections.OrderedDict()
_PROGRAMS_KEPT = 16


def autocast_state(model):
    """The autocast dtype in force on ``model``'s device, or None. torch.export records the dtypes it
    traced (and asserts them), so a program exported under autocast runs only under the same autocast."""
    device = next(iter(model.parameters()), torch.empty(0)).device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return str(torch.get_autocast_dtype(device))
    return None


def _program_key(model, args: tuple, kwargs: dict, hugging_face: bool):
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
        autocast_state(model),
        tuple(params),
        tuple(signature(a) for a in args),
        tuple((k, signature(v)) for k, v in kwargs.items()),
    )


def _template(program):
    """The program with every model tensor on the meta device (shapes and graph only)."""

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
        elif leaf in owner._buffers:  # a bitsandbytes weight is a buffer of its stand-in: its plain alias
            owner.register_buffer(leaf, tensor if type(tensor) in (torch.Tensor, torch.nn.Parameter) else tensor.as_subclass(torch.Tensor))
    stale = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.device.type == "meta"]
    if stale:
        raise ModelError(f"a cached program could not be bound to this model: {', '.join(stale[:3])} has no tensor")
    return gm


def cached_program(model, args: tuple, kwargs: dict, hugging_face: bool):
    """The program this process exported before for this model's architecture and call, or None."""
    return _remembered(_program_key(model, args, kwargs, hugging_face))


def _remembered(key):
    if key is None or key not in _PROGRAMS:
        return None
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]


def export_program(model, args: tuple, kwargs: dict, hugging_face: bool, name: str, *, dynamic: bool = True):
    """``torch.export.export(strict=False)`` with dynamic batch (and sequence for token inputs).

    ``dynamic=False`` keeps the example's shapes: for a model of fake tensors, whose program
    only tells its sites and dataflow and never runs, symbolic sizes would only make each
    traced op dearer (the same ops are traced either way).

    Programs of Hugging Face models are cached per architecture, config, mode and call
    signature; use :func:`bind_program` to run one. Failures become a ModelError naming
    the innermost module that was running.
    """
    key = _program_key(model, args, kwargs, hugging_face) if dynamic else None
    remembered = _remembered(key)
    if remembered is not None:
        return remembered
    program = _export(model, args, kwargs, hugging_face, name, dynamic)
    if key is not None:
        _PROGRAMS[key] = _template(program)
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    return program


def _export(model, args: tuple, kwargs: dict, hugging_face: bool, name: str, dynamic: bool = True):
    dynamic = dynamic_shapes(args, kwargs, hugging_face) if dynamic else None
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
    try:  # bitsandbytes linears are seen as surgeon ops (their stand-ins)
        with _quiet_torch_logs(), _named_keywords(model, kwargs), quantized_stand_ins(model):
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
    with contextlib.redirect_stderr(buffer):
        yield  # an export that raises propagates from here: its text is not written
    sys.stderr.write(buffer.getvalue())


def dynamic_shapes(args: tuple, kwargs: dict, hugging_face: bool):
    """Batch is dynamic for every tensor input; sequence too for a Hugging Face model's token inputs."""

    def spec(name, value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        if hugging_face and name in TOKEN_INPUTS and value.dim() >= 2:
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

    def widen(name, value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        dims = (0, 1) if hugging_face and name in TOKEN_INPUTS and value.dim() >= 2 else (0,)
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
