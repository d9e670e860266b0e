"""Every artifact of a compiled model in one folder: what ``surgeon compile -o OUT`` writes, as one call.

``write_artifacts(compiled, out, fold=...)`` writes, into a staging folder
that then replaces OUT whole (output_folder.py: a lock, no foreign files, the
earlier OUT intact if anything fails)::

    plan.json          the plan (Plan.to_json)
    adapter/           every adapter in PEFT's format (save_adapter)
    program.pt2        the adapted evaluation program, adapters kept (export(fold=False))
    merged/            with fold, for a Hugging Face model: the folded checkpoint
    merged.pt2         with fold: the folded program
    fold_report.json   with fold of a quantized model: what the merge changed in the outputs

One verified fold serves both merged artifacts. The compiled model is left in
eval mode.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from surgeon.atomic import write_text
from surgeon.checkpoints.output_folder import OutputFolder, check_free_space

__all__ = ["write_artifacts", "output_bytes"]


def write_artifacts(compiled, out, *, fold: bool = False, quantized: str = "dequantize", folder: OutputFolder | None = None,
                    on_step=None) -> list:
    """Write ``compiled``'s artifacts to ``out``; returns the names written (folders end in '/').

    ``quantized``: how a fold treats bitsandbytes sites ("dequantize" or "requantize", see Compiled.fold).
    ``folder``: an OutputFolder already opened on ``out`` (the CLI opens it before compiling, so that an
    unwritable OUT fails first); it is committed here. ``on_step(name, None)`` hears each step start,
    ``on_step(name, seconds)`` its end.
    """
    if folder is None:
        with OutputFolder(Path(out), "write_artifacts") as opened:
            return write_artifacts(compiled, out, fold=fold, quantized=quantized, folder=opened, on_step=on_step)
    stage, written = folder.staging, []

    def step(name, work, file=None):
        if on_step is not None:
            on_step(name, None)
        started = time.perf_counter()
        result = work()
        if on_step is not None:
            on_step(name, time.perf_counter() - started)
        if file is not None:
            written.append(file)
        return result

    check_free_space(stage.parent, output_bytes(compiled, fold), str(out))
    write_text(stage / "plan.json", json.dumps(compiled.plan.to_json(), indent=2) + "\n")
    written.append("plan.json")
    step("save adapter", lambda: compiled.save_adapter(stage / "adapter"), "adapter/")
    compiled.eval()
    step("export program.pt2", lambda: compiled.export(stage / "program.pt2", fold=False), "program.pt2")
    if fold:
        folded = step("fold", lambda: compiled.fold(quantized=quantized))
        if compiled.hugging_face:
            step("save merged checkpoint", lambda: folded.save_pretrained(stage / "merged"), "merged/")
        step("export merged.pt2", lambda: folded.export(stage / "merged.pt2"), "merged.pt2")
        if compiled.fold_report is not None:
            write_text(stage / "fold_report.json", json.dumps(compiled.fold_report, indent=2) + "\n")
            written.append("fold_report.json")
    folder.commit()
    return written


def output_bytes(compiled, fold: bool) -> int:
    """About how many bytes :func:`write_artifacts` writes: the adapter, twice (its tensors and PEFT's copy of the
    plan), and the base weights once per file that holds them (program.pt2; with a fold merged/ and merged.pt2).
    A lower bound: a checkpoint's headers and a dequantized fold's wider weights come on top."""
    seen, weights, adapter = set(), 0, 0
    model = compiled.base_model
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            weights += tensor.numel() * tensor.element_size()
    for _, parameter in compiled.trainable_parameters():
        adapter += parameter.numel() * parameter.element_size()
    return 2 * adapter + weights * (3 if fold else 1)
