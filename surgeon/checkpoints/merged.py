"""A merged Hugging Face checkpoint: every adapter folded into the base weights.

``save_merged(compiled, dir)`` writes what ``save_pretrained`` writes (config,
``model.safetensors``) with the folded weights; ``from_pretrained`` loads it
and gives the folded model's outputs. Files are written into a temporary
folder beside ``dir`` and moved into place one by one, each atomically.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from surgeon.grammar.diagnostics import SurgeryError

from surgeon.distributed import refuse_sharded, writes_files

from .atomic import output_folder

__all__ = ["save_merged"]


def save_merged(compiled, directory, adapters: dict | None = None, quantized: str = "dequantize") -> None:
    refuse_sharded(compiled, "save_pretrained")
    if not writes_files():  # in a process group, rank 0 writes
        return
    model = compiled.base_model
    if not hasattr(model, "save_pretrained"):
        raise SurgeryError(
            f"{type(model).__name__} is not a Hugging Face model: it has no save_pretrained",
            hint="use compiled.export(path) for a .pt2 program, or compiled.merged_state_dict()",
        )
    # Adapters whose change the tied readers see too (trainable tokens) keep the tie; others would break it.
    weights = compiled._fold_weights(adapters)
    folded = {
        f"{path}.weight"
        for name, path, adapter in compiled.sites()
        if weights.get(name, 0.0) and not getattr(adapter, "follows_ties", False)
    }
    for group in compiled.captured.ties:
        touched = folded & set(group)
        if touched and getattr(model.config, "tie_word_embeddings", False):
            raise SurgeryError(
                f"cannot save a merged checkpoint: {', '.join(sorted(touched))} is tied to "
                f"{', '.join(sorted(set(group) - touched))} and folding would untie them",
                hint="do not adapt a tied weight, or set config.tie_word_embeddings = False first",
            )
    state = compiled.merged_state_dict(adapters, quantized)
    directory = output_folder(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with _own_state_dict(model, quantized == "dequantize"):
            model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        for item in staging.iterdir():
            os.replace(item, directory / item.name)
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
