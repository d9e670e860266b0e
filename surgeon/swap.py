"""Hot-swapping LoRA adapters: new weights into a compiled graph or a saved program, with no new graph.

A LoRA site compiled with rank r and scale s computes ``s * B A x``. An
adapter of rank r' <= r and scale s' on the same site is written into the
same tensors as::

    A <- [A'; 0]            (r, in): the new rows, then zero rows
    B <- [B' s'/s, 0]       (out, r): the new columns rescaled, then zero columns

so that ``s B A = s' B' A'`` exactly where s'/s is exact, and the program's
shapes and constants (its scale) do not change: a ``torch.compile``d graph is
not recompiled, and a saved ``.pt2`` program is not exported again. Sites the
new adapter does not adapt get zeros (no change). A site the program has no
adapter on, or a rank above the compiled one, is an error naming what to
compile for.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from surgeon.grammar.diagnostics import SurgeryError

from .checkpoints.peft import CONFIG, PREFIX, _read_tensors, read_peft_config

__all__ = ["swapped_factors", "peft_site_scale", "swap_program_adapter", "PROGRAM_METADATA"]

PROGRAM_METADATA = "surgeon.json"  # extra file of a saved program: each adapter's LoRA sites, ranks and scales


def peft_site_scale(config: dict, path: str) -> float:
    """The scale PEFT gives ``path`` under a LoRA config (rank_pattern / alpha_pattern as PEFT matches them)."""

    def pattern_value(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    r = pattern_value(config.get("rank_pattern"), config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def swapped_factors(sites: dict, directory) -> dict:
    """path -> (A, B) to write into sites compiled as ``sites`` (path -> (rank, scale, in, out)), for the
    PEFT LoRA adapter in ``directory``."""
    directory = Path(directory)
    config = read_peft_config(directory)
    if config["peft_type"] != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise SurgeryError(
            f"{directory / CONFIG}: hot-swapping takes plain LoRA adapters (this one is {config['peft_type']}"
            f"{' with DoRA' if config.get('use_dora') else ''}{' with a bias' if config.get('lora_bias') else ''})",
            hint="compile a new model for other methods",
        )
    if isinstance(config.get("init_lora_weights"), str) and config["init_lora_weights"] not in ("gaussian",):
        raise SurgeryError(f"{directory / CONFIG}: an init_lora_weights={config['init_lora_weights']!r} adapter "
                           "changes the base weight; save it converted (surgeon does) to swap it in")
    tensors = _read_tensors(directory)
    new: dict = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise SurgeryError(f"{directory}: {key} is not a LoRA weight this swap can take (modules_to_save?)")
        new.setdefault(match.group(1), {})[match.group(2)] = tensor
    extra = sorted(set(new) - set(sites))
    if extra:
        raise SurgeryError(f"{directory}: the adapter adapts {extra[0]}, where this program has no LoRA site",
                           hint="compile with rules that adapt it too (a zero adapter there changes nothing)")
    out: dict = {}
    for path, (rank, scale, in_features, out_features) in sites.items():
        a_new = torch.zeros(rank, in_features)
        b_new = torch.zeros(out_features, rank)
        if path in new:
            a, b = new[path]["A"].float(), new[path]["B"].float()
            r = a.shape[0]
            if r > rank:
                raise SurgeryError(
                    f"{directory}: the adapter has rank {r} at {path}; this program was compiled with rank {rank} there",
                    hint=f"compile with lora(r={r}) (or higher) on that site to swap this adapter in",
                )
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise SurgeryError(f"{directory}: {path} has shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                   f"this site is ({rank}, {in_features}), ({out_features}, {rank})")
            a_new[:r] = a
            b_new[:, :r] = b * (peft_site_scale(config, path) / scale)
        out[path] = (a_new, b_new)
    return out


def swap_program_adapter(program, directory, name: str = "default", out=None):
    """Swap a LoRA adapter into a saved program (a ``.pt2`` path, exported with ``fold=False``).

    Returns the ExportedProgram with the new weights (and writes it to ``out`` when given).
    """
    from .checkpoints.atomic import atomic_path

    from .checkpoints.program import register_ops

    register_ops()
    extra = {PROGRAM_METADATA: ""}
    program = torch.export.load(str(program), extra_files=extra)
    if not extra[PROGRAM_METADATA]:
        raise SurgeryError("this program was not saved by surgeon with its adapters kept (export(..., fold=False))")
    sites = {p: tuple(v) for p, v in json.loads(extra[PROGRAM_METADATA]).get(name, {}).items()}
    if not sites:
        raise SurgeryError(f"this program has no LoRA sites of an adapter named {name!r}")
    prefix = "surgeon_" + re.sub(r"\W", lambda m: f"_{ord(m.group()):x}_", name) + "__"
    with torch.no_grad():
        for path, (a, b) in swapped_factors(sites, directory).items():
            for leaf, value in (("lora_A", a), ("lora_B", b)):
                tensor = program.state_dict[f"{path}.{prefix}{leaf}"]
                tensor.copy_(value.to(tensor.dtype))
    if out is not None:
        with atomic_path(Path(out)) as tmp:
            torch.export.save(program, str(tmp), extra_files=extra)
    return program
