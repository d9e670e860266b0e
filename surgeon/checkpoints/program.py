"""Deployable programs as files: a ``.pt2`` (``torch.export.save``) written atomically, and read back checked.

A program exported with its adapters kept (``export(fold=False)``) carries one
extra file, ``extra/surgeon.json``: for each adapter, its low-rank sites (those
whose update is exactly ``s B A``) as ``{path: [rank, scale, in, out]}``, what a
hot swap (hot_swap.py) needs to write another adapter's factors into the
program's tensors. Loading checks the whole archive first (program_archive.py,
program_graph.py), as a ``.pt2`` may come from anyone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from surgeon.atomic import output_folder, save_exported
from surgeon.diagnostics import SurgeryError

from surgeon.checkpoints.program_archive import open_program

__all__ = ["PROGRAM_METADATA", "program_path", "write_program", "program_sites", "load_program"]

PROGRAM_METADATA = "surgeon.json"  # extra file of a saved program: each adapter's low-rank sites, ranks and scales


def program_path(path) -> Path:
    """``path`` ready to be written (its folder made), refused when it is a folder: checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise SurgeryError(f"cannot write the program to {path}: it is a folder", hint="give a file name ending in .pt2")
    output_folder(path.parent)
    return path


def write_program(program, path, low_rank_sites: dict | None = None) -> None:
    """Save the ExportedProgram ``program`` to ``path`` atomically (a failed write, a full disk, is a SurgeryError).

    ``low_rank_sites``: adapter -> path -> (rank, scale, in, out), kept as ``extra/surgeon.json`` for a hot swap.
    """
    extra = {} if low_rank_sites is None else {PROGRAM_METADATA: json.dumps(low_rank_sites)}
    save_exported(program, path, extra_files=extra)


def program_sites(text, program) -> dict:
    """adapter -> path -> (rank, scale, in, out) from a program's ``extra/surgeon.json``, checked to be
    what :func:`write_program` writes: an object of objects of [int, finite number, int, int]."""
    where = f"{program}: extra/{PROGRAM_METADATA}"
    hint = "this file was not written by surgeon's export(fold=False), or was changed since"
    try:
        found = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the decoder's depth bound
        raise SurgeryError(f"{where} is not valid JSON ({exc})", hint=hint) from None
    if not isinstance(found, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in found.items()):
        raise SurgeryError(f"{where} is not an object of adapters, each an object of its low-rank sites", hint=hint)

    def count(x):
        return type(x) is int and x > 0

    for adapter, sites in found.items():
        for path, site in sites.items():
            if not (isinstance(site, list) and len(site) == 4 and count(site[0]) and count(site[2]) and count(site[3])
                    and type(site[1]) in (int, float) and math.isfinite(site[1]) and site[1] != 0):
                raise SurgeryError(f"{where}: {adapter!r} site {path!r} is {str(site)[:80]}, not "
                                   "[rank, scale, in, out] (positive ints, a finite non-zero scale)", hint=hint)
    return {adapter: {p: tuple(v) for p, v in sites.items()} for adapter, sites in found.items()}


def load_program(path):
    """The saved program, ready to call (``.module()(**inputs)``).

    The file is checked before torch reads it (program_archive.py): a ``.pt2``
    from anyone loads without running code of its own; anything else is a
    SurgeryError naming the file.
    """
    return open_program(path)[0]
