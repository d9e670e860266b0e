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

from surgeon.diagnostics import SurgeryError

from surgeon.checkpoints.peft_fields import check_peft_fields
from surgeon.checkpoints.peft_folder import CONFIG, WEIGHTS, read_peft_config, read_tensors
from surgeon.methods.peft_format import PREFIX, AdapterError

__all__ = ["swapped_factors", "peft_site_scale", "program_sites", "swap_program_adapter", "PROGRAM_METADATA"]

PROGRAM_METADATA = "surgeon.json"  # extra file of a saved program: each adapter's LoRA sites, ranks and scales


def peft_site_scale(config: dict, path: str) -> float:
    """The scale PEFT gives ``path`` under a LoRA config (rank_pattern / alpha_pattern as PEFT matches them)."""

    from surgeon.grammar.regex import RegexError, RegexTimeout, regex_fullmatch

    def pattern_value(patterns: dict, default):
        for key, value in (patterns or {}).items():
            try:  # PEFT: the key matches the path's end, at a dot; bounded, as every regex surgeon matches
                if regex_fullmatch(rf"(?:.*\.)?(?:{key})", path):
                    return value
            except RegexTimeout as exc:
                raise AdapterError(f"the pattern key {key!r} took longer than {exc.seconds:g} s to match {path!r}",
                                   hint="nested repetition such as (a+)+ backtracks; write each part once") from None
            except RegexError as exc:
                raise AdapterError(f"the pattern key {key!r} is not a regex surgeon can match: {exc.message}") from None
        return default

    r = pattern_value(config.get("rank_pattern"), config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _checked_config(directory: Path) -> dict:
    """The adapter's config, refused unless it is plain LoRA with fields of PEFT's types and positive ranks."""
    config = read_peft_config(directory)
    try:
        check_peft_fields(config)
    except AdapterError as exc:
        found = exc.diagnostics[0]
        raise AdapterError(f"{directory / CONFIG}: {found.message}", hint=found.hint) from None
    if config["peft_type"] != "LORA" or config.get("use_dora") or config.get("lora_bias"):
        raise SurgeryError(
            f"{directory / CONFIG}: hot-swapping takes plain LoRA adapters (this one is {config['peft_type']}"
            f"{' with DoRA' if config.get('use_dora') else ''}{' with a bias' if config.get('lora_bias') else ''})",
            hint="compile a new model for other methods",
        )
    if isinstance(config.get("init_lora_weights"), str) and config["init_lora_weights"] not in ("gaussian",):
        raise SurgeryError(f"{directory / CONFIG}: an init_lora_weights={config['init_lora_weights']!r} adapter "
                           "changes the base weight; save it converted (surgeon does) to swap it in")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if any(r <= 0 for r in ranks):  # the scale divides by the rank
        raise AdapterError(f"{directory / CONFIG}: a LoRA rank must be positive (found {min(ranks)})",
                           hint="adapter_config.json is not as PEFT writes it")
    return config


def _factor_pairs(directory: Path, tensors: dict) -> dict:
    """module path -> {"A": (r, in), "B": (out, r)}, refusing a key that is not a LoRA factor, a half pair,
    or factors whose shapes do not make a product B A."""
    pairs: dict = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise SurgeryError(f"{directory}: {key} is not a LoRA weight this swap can take (modules_to_save?)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    for path, pair in pairs.items():
        for leaf in "AB":
            if leaf not in pair:
                raise AdapterError(f"{directory / WEIGHTS}: {PREFIX}{path}.lora_{leaf}.weight is missing "
                                   f"(it has lora_{'BA'[leaf == 'B']} there)", hint="a LoRA site needs both factors")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{directory / WEIGHTS}: {path} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)} "
                               f"({a.dtype}, {b.dtype}); LoRA's are floating (r, in) and (out, r)")
    return pairs


def swapped_factors(sites: dict, directory) -> dict:
    """path -> (A, B) to write into sites compiled as ``sites`` (path -> (rank, scale, in, out)), for the
    PEFT LoRA adapter in ``directory``. Everything is checked before anything is returned, so a caller
    that writes only after this returns never writes half an adapter."""
    directory = Path(directory)
    config = _checked_config(directory)
    new = _factor_pairs(directory, read_tensors(directory))
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


def program_sites(text, program) -> dict:
    """adapter -> path -> (rank, scale, in, out) from a program's ``extra/surgeon.json``, checked to be
    what export writes (program.py:lora_sites): an object of objects of [int, finite number, int, int]."""
    where = f"{program}: extra/{PROGRAM_METADATA}"
    hint = "this file was not written by surgeon's export(fold=False), or was changed since"
    try:
        found = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the decoder's depth bound
        raise SurgeryError(f"{where} is not valid JSON ({exc})", hint=hint) from None
    if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in found.items()):
        raise SurgeryError(f"{where} is not an object of adapters, each an object of its LoRA sites", hint=hint)

    def count(x):
        return type(x) is int and x > 0

    for adapter, sites in found.items():
        for path, site in sites.items():
            if not (isinstance(site, list) and len(site) == 4 and count(site[0]) and count(site[2]) and count(site[3])
                    and type(site[1]) in (int, float) and math.isfinite(site[1]) and site[1] != 0):
                raise SurgeryError(f"{where}: {adapter!r} site {path!r} is {str(site)[:80]}, not "
                                   "[rank, scale, in, out] (positive ints, a finite non-zero scale)", hint=hint)
    return {adapter: {p: tuple(v) for p, v in sites.items()} for adapter, sites in found.items()}


def _output(out) -> Path:
    """``out`` ready to be written (its folder made, as export does), checked before any work is done."""
    from surgeon.atomic import output_folder

    out = Path(out)
    if out.is_dir():
        raise SurgeryError(f"cannot write the program to {out}: it is a folder", hint="give a file name ending in .pt2")
    output_folder(out.parent)
    return out


def swap_program_adapter(program, directory, name: str = "default", out=None):
    """Swap a LoRA adapter into a saved program (a ``.pt2`` path, exported with ``fold=False``).

    Returns the ExportedProgram with the new weights (and writes it to ``out`` when given). The program
    is loaded through surgeon's checks (checkpoints/program_archive.py); every site, key and shape is
    checked before the first tensor is written, and ``out`` is replaced atomically.
    """
    from surgeon.atomic import save_exported
    from surgeon.checkpoints.program_archive import open_program

    out = _output(out) if out is not None else None
    loaded, extra = open_program(program)
    if PROGRAM_METADATA not in extra:
        raise SurgeryError(f"{program} was not saved by surgeon with its adapters kept",
                           hint="export(..., fold=False) saves what a swap needs")
    sites = program_sites(extra[PROGRAM_METADATA], program).get(name, {})
    if not sites:
        raise SurgeryError(f"{program} has no LoRA sites of an adapter named {name!r}")
    prefix = "surgeon_" + re.sub(r"\W", lambda m: f"_{ord(m.group()):x}_", name) + "__"
    writes = []
    for path, (a, b) in swapped_factors(sites, directory).items():
        for leaf, value in (("lora_A", a), ("lora_B", b)):
            key = f"{path}.{prefix}{leaf}"
            tensor = loaded.state_dict.get(key)
            if tensor is None or tuple(tensor.shape) != tuple(value.shape):
                raise SurgeryError(f"{program}: extra/{PROGRAM_METADATA} lists {path} with {leaf} of shape "
                                   f"{tuple(value.shape)}, which the program's weights do not hold"
                                   + ("" if tensor is None else f" (they hold {key} of shape {tuple(tensor.shape)})"),
                                   hint="the program and its surgeon.json disagree: re-export it")
            writes.append((tensor, value))
    with torch.no_grad():
        for tensor, value in writes:  # only now, with everything checked
            tensor.copy_(value.to(tensor.dtype))
    if out is not None:
        save_exported(loaded, out, extra_files=extra)
    return loaded
