"""The capture cache: what a capture found (sites and roles), kept on disk for the next process.

Exporting is most of what planning costs (torch.export traces every layer;
bench/plan_7b.py measures it), and what capture finds depends on the model's architecture and configuration, not
on its weights. After a capture of a Hugging Face model, its sites and roles
are written as JSON to ``$SURGEON_CACHE_DIR/captures/`` (default
``$XDG_CACHE_HOME/surgeon``, else ``~/.cache/surgeon``), one file per key:

    the model's class, its config (every field), attention implementation and
    training mode; every module's path and class, with a hash of the code of
    each class's forward (a patched or edited forward is another key); each
    parameter's name, shape, dtype and tensor type, and which ones are tied;
    the device type; the example inputs' names, ranks and dtypes; the versions
    of torch and transformers, and a hash of surgeon's capture code

The next capture of the same key, in any process, reads the file instead of
exporting (``Captured.cached``; ``Captured.program`` is then None, and a
compiled model exports when its first call needs a graph). Only JSON is read,
and nothing in it is trusted: each file carries a SHA-256 of its sites and
roles (an edited file, one that swaps two roles say, no longer matches it), and
every site must name a module and a parameter of the live model, of the shape
the model has, every role a module and a role the language knows. A file that
fails any of this (or does not parse, or is not an object) is a miss: the
model is captured again and the file rewritten. Files are written
atomically, so many processes (ranks of one job) may write the same key. What
the key cannot see: an edit to a function the forwards call (inside an
editable transformers install, say) - turn the cache off, or clear the folder,
while editing model code.
``SURGEON_CAPTURE_CACHE=0`` turns the cache off; models without a config
(plain ``nn.Module``) are never cached, as nothing describes their forward.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import marshal
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor

from surgeon._version import __version__
from surgeon.atomic import atomic_path
from surgeon.capture.roles import UNKNOWN
from surgeon.capture.sites import Site
from surgeon.grammar.vocabulary import ROLES
from surgeon.methods import SITE_KINDS

__all__ = ["cache_folder", "capture_key", "load_capture", "store_capture"]

FORMAT = 3  # 2: sites have parts (MultiheadAttention's two projections); 3: a checksum of the content
# The code whose output the cache holds: a change to any of it is a new key. (Read as source files, never imported
# from here: captured.py, which imports this module, is among them.)
_ANALYSIS = ("surgeon.capture.captured", "surgeon.capture.sites", "surgeon.capture.roles", "surgeon.capture.export",
             "surgeon.capture.quantized_bases", "surgeon.kernels.quantized", "surgeon.grammar.vocabulary")


def cache_folder() -> Path | None:
    """Where captures are kept, or None when the cache is off."""
    if os.environ.get("SURGEON_CAPTURE_CACHE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    root = os.environ.get("SURGEON_CACHE_DIR")
    if not root:
        try:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "surgeon"
        except RuntimeError:  # no home folder to be found: no cache
            return None
    return Path(root) / "captures"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    digest = hashlib.sha256(__version__.encode())
    for name in _ANALYSIS:
        try:
            digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
        except (OSError, TypeError, AttributeError):  # no source on disk (a zipped install): the version stands for it
            digest.update(name.encode())
    transformers_version = importlib.metadata.version("transformers")  # the installed one, without importing it
    return f"torch {torch.__version__}; transformers {transformers_version}; surgeon {digest.hexdigest()[:16]}"


def _code_hash(function) -> str:
    """A hash of a function's code (bytecode, constants, names), or its qualified name if it has none."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None:
        return getattr(function, "__qualname__", repr(type(function)))
    try:
        return hashlib.sha256(marshal.dumps(code)).hexdigest()[:16]
    except ValueError:  # a code object marshal cannot write
        return code.co_qualname if hasattr(code, "co_qualname") else code.co_name


def capture_key(opened) -> str | None:
    """The cache key of an opened model (a hex digest), or None when it cannot be cached."""
    model = opened.module
    config = getattr(model, "config", None)
    if not opened.is_hugging_face or config is None or not hasattr(config, "to_json_string"):
        return None

    def kind(p) -> str:  # planning builds the model of fake tensors: the same capture as real ones
        return "Parameter" if isinstance(p, FakeTensor) or isinstance(getattr(p, "data", None), FakeTensor) else type(p).__name__

    def signature(v):
        if isinstance(v, torch.Tensor):
            return ["tensor", v.dim(), str(v.dtype)]
        return repr(v)

    def class_name(module) -> str:
        return f"{type(module).__module__}.{type(module).__qualname__}"

    forwards = {}  # one hash per distinct forward: a class's, or one patched onto an instance
    modules = []
    for path, module in model.named_modules():
        forward = module.__dict__.get("forward", type(module).forward)
        name = f"{class_name(module)}{'+instance' if 'forward' in module.__dict__ else ''}"
        forwards.setdefault(name, _code_hash(forward))
        modules.append([path, name])
    ties: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(n)
    first = next(iter(model.parameters()), None)
    parts = {
        "format": FORMAT,
        "code": _code_version(),
        "class": class_name(model),
        "modules": modules,
        "forwards": sorted(forwards.items()),
        "ties": sorted(group for group in ties.values() if len(group) > 1),
        "device": first.device.type if first is not None else None,
        "config": config.to_json_string(use_diff=False),
        "attention": str(getattr(config, "_attn_implementation", None)),
        "training": model.training,
        "parameters": [[n, list(p.shape), str(p.dtype), kind(p)] for n, p in model.named_parameters(remove_duplicate=False)],
        "args": [signature(a) for a in opened.example_args],
        "kwargs": [[k, signature(v)] for k, v in opened.example_kwargs.items()],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _checksum(sites, roles) -> str:
    return hashlib.sha256(json.dumps([sites, roles], sort_keys=True).encode()).hexdigest()


def load_capture(key: str | None, model) -> tuple[dict, dict] | None:
    """(sites: path -> Site, roles: path -> role) kept under ``key``, or None: also for a file that is not
    exactly what :func:`store_capture` wrote for ``model``, the live module it is checked against (see the
    module's docstring)."""
    folder = cache_folder()
    if key is None or folder is None:
        return None
    try:
        found = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # missing, unreadable or nested past the decoder's bound: capture again
        return None
    try:
        return _validated(found, key, model)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):  # malformed in any way: capture again
        return None


def _validated(found, key: str, model) -> tuple[dict, dict] | None:
    if not isinstance(found, dict) or found.get("format") != FORMAT or found.get("key") != key:
        return None
    if found.get("checksum") != _checksum(found["sites"], found["roles"]):
        return None
    modules = dict(model.named_modules())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    names = {f.name for f in fields(Site)}

    def shape_of(value) -> tuple:
        if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value):
            raise TypeError("not a shape")
        return tuple(value)

    sites = {}
    for entry in found["sites"]:
        if not isinstance(entry, dict) or set(entry) != names:
            return None
        fields_ = dict(entry, weight_shape=shape_of(entry["weight_shape"]), nodes=tuple(entry["nodes"]),
                       tied_with=tuple(entry["tied_with"]),
                       parts=tuple((weight, shape_of(shape)) for weight, shape in entry["parts"]))
        site = Site(**fields_)
        weights = [(site.weight, site.weight_shape), *site.parts]
        if (site.path not in modules or site.path in sites or site.kind not in SITE_KINDS
                or any(shapes.get(w) != s for w, s in weights) or not all(t in shapes for t in site.tied_with)
                or not all(isinstance(n, str) for n in site.nodes) or type(site.in_features) is not int
                or type(site.out_features) is not int or not isinstance(site.quantization, (str, type(None)))):
            return None
        sites[site.path] = site
    roles = found["roles"]
    known = set(ROLES) | {UNKNOWN, "norm"}
    if not isinstance(roles, dict) or not all(path in modules and role in known for path, role in roles.items()):
        return None
    return sites, dict(roles)


def store_capture(key: str | None, captured) -> None:
    """Keep ``captured``'s sites and roles under ``key`` (nothing when the cache is off or cannot be written)."""
    folder = cache_folder()
    if key is None or folder is None:
        return
    # Through JSON once, so that the checksum is of exactly what a reader will see (tuples as lists).
    sites = json.loads(json.dumps([asdict(site) for site in captured.sites.values()]))
    roles = {path: info.role for path, info in captured.modules.items() if info.role is not None}
    payload = {"format": FORMAT, "key": key, "model": captured.opened.name, "sites": sites, "roles": roles,
               "checksum": _checksum(sites, roles)}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{key}.json") as tmp:
            tmp.write_text(json.dumps(payload), encoding="utf-8")
    except OSError:  # a read-only home or a full disk: the cache is an optimisation, never a failure
        pass
