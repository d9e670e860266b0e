"""A merged Hugging Face checkpoint: every adapter folded into the base weights.

:func:`write_merged_checkpoint` writes what ``save_pretrained`` writes (config,
``model.safetensors``) with a merged state dict: the one verified fold's
(``compiled.fold(...).state_dict()``, see surgeon/compiled/merged_model.py);
``from_pretrained`` loads it and gives the folded model's outputs. The checkpoint
is written into a temporary folder beside ``dir``, which then takes ``dir``'s
place whole: ``dir`` holds exactly the new checkpoint. A write that fails (a
full disk) is a SurgeryError, and ``dir`` stays as it was.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from pathlib import Path

from surgeon.atomic import output_folder, replace_folder, writing
from surgeon.diagnostics import SurgeryError

__all__ = ["check_merged_checkpoint", "write_merged_checkpoint"]


def check_merged_checkpoint(model, changed: set, ties) -> None:
    """Refuse, before any fold is computed, a merged checkpoint ``model`` cannot be saved as.

    ``model``: the base model (a Hugging Face model has ``save_pretrained``); ``changed``: the names of the
    weights the fold changes; ``ties``: groups of parameter names that share one tensor. A changed weight
    tied to an unchanged one would be untied by the merge, which ``tie_word_embeddings`` would undo on load.
    """
    if not hasattr(model, "save_pretrained"):
        raise SurgeryError(
            f"{type(model).__name__} is not a Hugging Face model: it has no save_pretrained",
            hint="use compiled.export(path) for a .pt2 program, or compiled.fold().state_dict()",
        )
    for group in ties:
        touched = set(changed) & set(group)
        if touched and getattr(model.config, "tie_word_embeddings", False):
            raise SurgeryError(
                f"cannot save a merged checkpoint: {', '.join(sorted(touched))} is tied to "
                f"{', '.join(sorted(set(group) - touched))} and folding would untie them",
                hint="do not adapt a tied weight, or set config.tie_word_embeddings = False first",
            )


def write_merged_checkpoint(model, state: dict, directory, *, dequantized: bool) -> None:
    """Write ``model``'s config with the merged ``state`` as a Hugging Face checkpoint folder, replacing ``directory``.

    ``dequantized``: the merge of a bitsandbytes model holds full-precision weights (no quantization_config).
    """
    directory = Path(directory)
    output_folder(directory.parent)
    if directory.exists() and not directory.is_dir():
        raise SurgeryError(f"cannot write into {directory}: it is a file, not a folder", hint="choose another output path")
    with writing(directory):  # a full disk (safetensors' error, or an OSError) is a SurgeryError naming the folder
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with _own_state_dict(model, dequantized):
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
