"""Open a model: a local Hugging Face folder, a Hub id, ``module:factory``, a demo, or an nn.Module.

``open_model(spec)`` gives an :class:`OpenedModel`: the module and the example
inputs that capture will trace it with. For Hugging Face models surgeon builds
those inputs from the config (input_ids, attention_mask, and labels when the
model has a language-model head). ``weights=False`` builds the model from its
config under a fake-tensor mode: shapes without storage, so a 7B-shaped model
is planned in a few hundred MB and no weight file is read.

Only safetensors are read, never pickles; remote code is never run. A folder's files
must lie inside it, and its weights must fill the model exactly (model_folders.py).
transformers and huggingface_hub are imported where they are used: a plain
nn.Module needs neither, and huggingface_hub reads its environment
(``HF_HUB_OFFLINE``) when it is imported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch._subclasses.fake_tensor import FakeTensorMode

from surgeon.capture.demos import DEMOS, QUANTIZED_DEMOS, build_demo, build_quantized_demo, demo_config
from surgeon.capture.model_folders import check_depth, check_loaded, inside_folder, model_class_of
from surgeon.diagnostics import ModelError

__all__ = ["OpenedModel", "open_model", "full_precision_source", "MODEL_FORMS"]

MODEL_FORMS = (
    "a local Hugging Face folder (config.json + *.safetensors), a Hub id (org/name or org/name@revision), "
    f"package.module:factory, or a demo ({', '.join('demo:' + n for n in DEMOS)}; "
    f"quantized: demo:llama-{{{','.join(QUANTIZED_DEMOS)}}})"
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# Language-model heads whose forward takes labels and returns a loss.
_LM_HEAD_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM")


@dataclass
class OpenedModel:
    """A model ready to capture: the module, how to call it, and where it came from."""

    module: Any
    name: str
    source: str  # "demo" | "folder" | "hub" | "factory" | "module"
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    config: Any = None  # a transformers PretrainedConfig, for Hugging Face models
    fake: bool = False  # parameters are fake tensors: shapes only, nothing to run
    fake_mode: Any = field(default=None, repr=False)
    # name -> the full-precision tensor of a bitsandbytes-quantized model (LoftQ); None: unknown
    full_precision: Any = field(default=None, repr=False)

    @property
    def is_hugging_face(self) -> bool:
        return self.config is not None


def open_model(spec: Any, *, weights: bool = True, example_inputs: Any = None) -> OpenedModel:
    """Open ``spec`` (see MODEL_FORMS, or pass an nn.Module) for capture."""
    if isinstance(spec, torch.nn.Module):
        opened = OpenedModel(spec, type(spec).__name__, "module", config=getattr(spec, "config", None))
    elif not isinstance(spec, (str, os.PathLike)):
        raise ModelError(f"cannot open a model from {type(spec).__name__}", hint=f"give {MODEL_FORMS}")
    else:
        text = os.fspath(spec)
        if text.startswith("demo:"):
            opened = _open_demo(text[5:], weights)
        elif Path(text).exists():
            opened = _open_folder(Path(text), weights)
        elif _FACTORY.fullmatch(text):
            opened = _open_factory(text)
        elif _HUB_ID.fullmatch(text):
            opened = _open_hub(text, weights)
        else:
            raise ModelError(f"cannot open model '{text}': no such folder, and not a model name", hint=f"give {MODEL_FORMS}")
    if example_inputs is not None:
        opened.example_args, opened.example_kwargs = _split_inputs(example_inputs, opened.name)
    elif not opened.example_args and not opened.example_kwargs and opened.is_hugging_face:
        try:
            with opened.fake_mode or contextlib.nullcontext():
                opened.example_kwargs = hugging_face_inputs(opened.module, opened.config)
        except Exception as exc:  # a config surgeon cannot read inputs from: say which, never a traceback
            raise ModelError(f"cannot make example inputs for {opened.name} from its config: {type(exc).__name__}: "
                             f"{_first_line(exc)}", hint="pass example_inputs= (a dict of keyword arguments)") from None
    return opened


# --- the forms ------------------------------------------------------------------------


def _open_demo(name: str, weights: bool) -> OpenedModel:
    base, _, scheme = name.partition("-")
    if base == "llama" and scheme in QUANTIZED_DEMOS:  # quantized from its weights, so opened with them
        _need_bitsandbytes(f"demo:{name}")
        model = build_quantized_demo(base, scheme)
        opened = OpenedModel(model, f"demo:{name}", "demo", config=model.config)
        opened.full_precision = full_precision_source(lambda: build_demo(base))
        return opened
    if name not in DEMOS:
        raise ModelError(f"unknown demo model '{name}'", hint=f"demos: {', '.join('demo:' + n for n in DEMOS)}")
    if weights:
        model = build_demo(name)
        return OpenedModel(model, f"demo:{name}", "demo", config=model.config)
    config, model_class = demo_config(name)
    return _fake_from_config(config, model_class, f"demo:{name}", "demo")


def full_precision_source(spec):
    """name -> full-precision tensor, read when first asked, from an nn.Module, a state dict, a function
    returning either, or a folder / file of safetensors (read lazily, as PEFT's LoftQ reads them)."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise ModelError(f"{path} holds no *.safetensors weights", hint="give the unquantized model's folder")

        def read(name):
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    if name in f.keys():
                        return f.get_tensor(name)
            raise ModelError(f"{path} has no tensor {name}", hint="give the unquantized weights of this same model")

        return read

    @functools.lru_cache(maxsize=1)
    def state():
        value = spec() if callable(spec) and not isinstance(spec, torch.nn.Module) else spec
        return value.state_dict() if isinstance(value, torch.nn.Module) else dict(value)

    def lookup(name):
        if name not in state():
            raise ModelError(f"the full-precision weights have no {name}", hint="give the unquantized weights of this same model")
        return state()[name]

    return lookup


def _need_bitsandbytes(what: str) -> None:
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        raise ModelError(f"{what} is quantized with bitsandbytes, which is not installed",
                         hint="pip install 'surgeon[bnb]' (bitsandbytes)") from None


def _open_folder(folder: Path, weights: bool, roots: tuple = ()) -> OpenedModel:
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise ModelError(
            f"{folder} is not a Hugging Face model folder: it has no config.json",
            hint="a model folder holds config.json and *.safetensors, as save_pretrained writes them",
        )
    inside_folder(folder, roots)
    config = _read_config(folder)
    check_depth(config, str(folder / "config.json"))
    model_class = model_class_of(config, str(folder))
    quantized = getattr(config, "quantization_config", None) is not None
    if quantized:  # bitsandbytes quantizes while loading: the sites' storage is known only with the weights
        _need_bitsandbytes(str(folder))
    if not weights and not quantized:
        return _fake_from_config(config, model_class, str(folder), "folder")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"{folder} has no *.safetensors weights",
            hint="surgeon reads only safetensors, never pickled .bin files; "
            "convert with save_pretrained(..., safe_serialization=True)",
        )
    try:
        model, info = model_class.from_pretrained(folder, config=config, use_safetensors=True, output_loading_info=True)
    except Exception as exc:  # transformers raises many types; all mean the same to the user
        raise ModelError(f"cannot load the weights in {folder}: {_first_line(exc)}", hint="check that the folder is complete") from None
    check_loaded(folder, info)
    return OpenedModel(model.eval(), str(folder), "folder", config=config)


def _open_hub(spec: str, weights: bool) -> OpenedModel:
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if weights:
            folder = snapshot_download(repo, revision=revision or None, allow_patterns=["*.json", "*.safetensors"])
        else:
            folder = str(Path(hf_hub_download(repo, "config.json", revision=revision or None)).parent)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = (
            "HF_HUB_OFFLINE is set and this model is not in the local Hugging Face cache; "
            "download it once with network access, or pass a local folder"
            if offline
            else "no network? set HF_HUB_OFFLINE=1 to use the local Hugging Face cache, or pass a local folder"
        )
        raise ModelError(f"cannot fetch '{spec}' from the Hugging Face Hub: {type(exc).__name__}", hint=hint) from None
    # A Hub snapshot's files are links into the cache's blobs folder: those lie inside the model's cache too.
    opened = _open_folder(Path(folder), weights, roots=(Path(folder).parents[1] / "blobs",))
    opened.name, opened.source = spec, "hub"
    return opened


def _open_factory(spec: str) -> OpenedModel:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import '{module_name}': {exc}", hint="is the package installed, or on PYTHONPATH?") from None
    except (Exception, SystemExit) as exc:  # the module's own code failed (sys.exit() included): say so, do not exit
        raise ModelError(f"the factory {spec} failed: importing '{module_name}' raised {_why(exc)}",
                         hint="fix the module, or import it in Python and pass the nn.Module") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelError(f"'{module_name}' has no function '{attribute}'", hint="give package.module:function")
    try:
        made = factory()
    except (Exception, SystemExit) as exc:
        raise ModelError(f"the factory {spec} failed: {spec}() raised {_why(exc)}",
                         hint="a factory returns the module, or (module, example_inputs)") from None
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
    if not isinstance(made, torch.nn.Module):
        raise ModelError(
            f"{spec}() returned {type(made).__name__}, not a torch.nn.Module",
            hint="return the module, or (module, example_inputs)",
        )
    opened = OpenedModel(made, spec, "factory", config=getattr(made, "config", None))
    if inputs is not None:
        opened.example_args, opened.example_kwargs = _split_inputs(inputs, spec)
    return opened


# --- helpers ---------------------------------------------------------------------------


def _read_config(folder: Path):
    from transformers import AutoConfig

    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise ModelError(f"cannot read {folder / 'config.json'}: {exc}") from None


def _fake_from_config(config, model_class, name: str, source: str) -> OpenedModel:
    """The model built from its config with fake tensors: real shapes, no storage, no weights read.

    It is built on the meta device, as transformers' ``from_pretrained`` builds every model: there
    ``init_weights`` skips weight initialisation (which would read values a fake tensor does not
    have: ViT's ``trunc_normal_`` asks ``mask.any()``) but still ties weights. Its tensors then
    become fake CPU tensors, ties kept, so that capture traces it like a real model.
    """
    try:
        with torch.device("meta"), _meta_safe_creation():
            model = model_class(config)
    except Exception as exc:  # a model's own __init__ can raise anything; the user needs which model and why
        raise ModelError(
            f"cannot build {name} ({model_class.__name__}) from its config: {type(exc).__name__}: {_first_line(exc)}",
            hint="planning builds the model without weights (on the meta device); "
            "check config.json, or plan with the weights loaded (surgeon.compile)",
        ) from None
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _to_fake(model, mode)
    return OpenedModel(model.eval(), name, source, config=config, fake=True, fake_mode=mode)


def _meta_safe_creation():
    """transformers' guard for building on the meta device (``torch.linspace`` on the CPU for ``.item()``
    schedules), when this transformers has it."""
    try:
        from transformers import initialization
    except ImportError:
        return contextlib.nullcontext()
    guard = getattr(initialization, "meta_device_safe_creation_ops", None)
    return guard() if guard is not None else contextlib.nullcontext()


def _to_fake(model, mode) -> None:
    """Replace every meta tensor of ``model`` (parameters, buffers, plain tensor attributes) by a fake
    CPU tensor of the same shape, dtype and strides; a tensor shared by several modules (tied weights)
    stays one tensor."""
    made: dict = {}  # id(meta tensor) -> (the meta tensor, kept alive so that its id stays its own; its fake)

    def fake(tensor):
        if id(tensor) not in made:
            with mode:
                value = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="cpu")
            if isinstance(tensor, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
            made[id(tensor)] = (tensor, value)
        return made[id(tensor)][1]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and tensor.device.type == "meta":
                    table[key] = fake(tensor)
        for key, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                module.__dict__[key] = fake(value)


def _why(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {_first_line(exc)}" if _first_line(exc) else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def hugging_face_inputs(model, config, batch: int = 2, seq: int = 8) -> dict:
    """Example inputs for a Hugging Face model, from its config (deterministic)."""
    parameters = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    kwargs: dict = {}
    if main == "pixel_values":
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(vision, "num_channels", 3)
        kwargs["pixel_values"] = torch.linspace(-1, 1, batch * channels * size * size).reshape(batch, channels, size, size)
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None) or 100
        ids = torch.arange(batch * seq).reshape(batch, seq) % vocab
        kwargs["input_ids"] = ids
        if "attention_mask" in parameters:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if "labels" in parameters and type(model).__name__.endswith(_LM_HEAD_SUFFIXES):
            kwargs["labels"] = ids.clone()
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
            kwargs["decoder_input_ids"] = ids.clone()  # an encoder-decoder (T5, BART) runs both stacks
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    return kwargs


def _split_inputs(inputs, name: str) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    raise ModelError(
        f"example inputs of {name} must be a tuple of arguments or a dict of keyword arguments, "
        f"not {type(inputs).__name__}"
    )
