"""A merged Hugging Face checkpoint: every adapter folded into the base weights.

``save_merged(folded, dir)`` writes what ``save_pretrained`` writes (config,
``model.safetensors``) with the folded weights: the state dict of the one
verified fold (``compiled.fold(...).state_dict()``); ``from_pretrained`` loads
it and gives the folded model's outputs. The checkpoint is written into a
temporary folder beside ``dir``, which then takes ``dir``'s place whole: ``dir``
holds exactly the new checkpoint. A write that fails (a full disk) is a SurgeryError,
and ``dir`` stays as it was.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from surgeon.diagnostics import SurgeryError

from surgeon.compiled.distributed import refuse_sharded, writes_files

from surgeon.atomic import output_folder, replace_folder, writing

__all__ = ["save_merged"]


def save_merged(folded, directory) -> None:
    """Write ``folded`` (a :class:`surgeon.compiled.folded.Folded`) as a Hugging Face checkpoint folder."""
    compiled, quantized = folded._compiled, folded.quantized
    refuse_sharded(compiled, "save_pretrained")
    if not writes_files():  # in a process group, rank 0 writes
        return
    model = compiled.base_model
    if not hasattr(model, "save_pretrained"):
        raise SurgeryError(
            f"{type(model).__name__} is not a Hugging Face model: it has no save_pretrained",
            hint="use compiled.export(path) for a .pt2 program, or compiled.fold().state_dict()",
        )
    # Adapters whose change the tied readers see too (trainable tokens) keep the tie; others would break it.
    weights = folded.weights
    changed = {
        f"{path}.weight"
        for name, path, adapter in compiled.sites()
        if weights.get(name, 0.0) and not getattr(adapter, "follows_ties", False)
    }
    for group in compiled.captured.ties:
        touched = changed & set(group)
        if touched and getattr(model.config, "tie_word_embeddings", False):
            raise SurgeryError(
                f"cannot save a merged checkpoint: {', '.join(sorted(touched))} is tied to "
                f"{', '.join(sorted(set(group) - touched))} and folding would untie them",
                hint="do not adapt a tied weight, or set config.tie_word_embeddings = False first",
            )
    state = folded.state_dict()
    directory = Path(directory)
    output_folder(directory.parent)
    if directory.exists() and not directory.is_dir():
        raise SurgeryError(f"cannot write into {directory}: it is a file, not a folder", hint="choose another output path")
    with writing(directory):  # a full disk (safetensors' error, or an OSError) is a SurgeryError naming the folder
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with _own_state_dict(model, quantized == "dequantize"):
                model.save_pretrained(staging, state_dict=state, safe_serialization=True)
            replace_folder(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _own_state_dict(model, dequantized: bool):
    """While saving a merge of a bitsandbytes model: its quantizer must not replace our state dict with the
    model's own (transformers does for quantized models), and a dequantized merge describes itself as
    unquantized (no quantization_config in config.json)."""
    if getattr(model.config, "quantization_config", None) is None:
        yield
        return
    import copy

    config, quantizer, flags = model.config, getattr(model, "hf_quantizer", None), {}
    model.hf_quantizer = None
    if dequantized:
        plain = copy.deepcopy(config)
        del plain.quantization_config
        model.config = plain
        for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if flag in model.__dict__:
                flags[flag] = model.__dict__[flag]
                model.__dict__[flag] = False
    try:
        yield
    finally:
        model.config, model.hf_quantizer = config, quantizer
        model.__dict__.update(flags)
