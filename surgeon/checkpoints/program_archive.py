"""Opening a saved program (``.pt2``) that may come from a stranger: check the archive, then let torch load it.

``torch.export.load`` trusts its file: it unpickles with ``weights_only=False``
and evaluates strings from it as Python (torch 2.13; see program_graph.py for
the strings). surgeon checks the whole archive first and hands torch only one
it can load without running code from the file. The facts checked:

- The file is a zip whose members are plain relative names (``[A-Za-z0-9._-]``
  parts, no ``..``, no absolute or drive paths), each once, stored
  uncompressed and unencrypted (as ``torch.export.save`` writes them: so that
  Python's zipfile, which checks here, and torch's miniz reader, which loads,
  cannot read different bytes under one name), all under one top folder.
- Its layout is the one ``torch.export.save`` writes for one program named
  ``model``: ``archive_format`` = ``pt2``, ``archive_version`` = ``0``,
  ``models/model.json``, the weights and constants configs, their payload
  files, ``data/sample_inputs/model.pt`` and ``extra/*``. Any other member is
  refused, among them what torch would unpickle or run: the legacy
  ``data/weights/model.pt`` / ``data/constants/model.pt`` pickles
  (``_package.py:_load_state_dict``), another ``models/*.json`` program,
  ``data/aotinductor/`` (a compiled shared library, ``_package.py:_load_aoti``)
  and the pre-2.7 ``serialized_*.pt`` layout (``torch/export/__init__.py``).
- Every weight and constant is a raw tensor payload (``use_pickle`` false, a
  ``tensor_meta``): torch loads a pickled one with ``torch.load(weights_only=False)``
  (``_package.py`` weights and constants), a ``custom_obj_*`` constant with
  TorchScript's unpickler and an ``opaque_obj_*`` one with ``pickle.loads``.
- The sample inputs load with ``torch.load(weights_only=True)``: torch tries
  that first and falls back to ``weights_only=False`` on failure
  (``serde/serialize.py:deserialize_torch_artifact``); loading the same bytes
  the same way here proves torch's first try succeeds.

The file is opened once and torch reads the same open file, so that what was
checked is what loads (a rename over the path meanwhile changes nothing).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import re
import zipfile
from pathlib import Path, PurePosixPath

import torch

import surgeon.kernels.quantized  # noqa: F401 (registers the quantized linears a bitsandbytes model's program calls)
from surgeon.diagnostics import SurgeryError
from surgeon.passes.lower import kernel_modules

from surgeon.checkpoints.program_graph import check_graph

__all__ = ["open_program", "check_archive", "ProgramArchiveError"]

MODEL = "model"  # the program's name in the archive: torch.export.load returns exported_programs["model"]
WEIGHTS_DIR, CONSTANTS_DIR = "data/weights/", "data/constants/"
WEIGHTS_CONFIG = f"{WEIGHTS_DIR}{MODEL}_weights_config.json"
CONSTANTS_CONFIG = f"{CONSTANTS_DIR}{MODEL}_constants_config.json"
GRAPH = f"models/{MODEL}.json"
SAMPLE_INPUTS = f"data/sample_inputs/{MODEL}.pt"
EXTRA_DIR = "extra/"
# What torch.export.save writes besides the payloads (byteorder and .data/* come from torch's zip writer).
FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
         GRAPH, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS}
REQUIRED = ("archive_format", "archive_version", GRAPH, WEIGHTS_CONFIG, CONSTANTS_CONFIG)
_PART = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_TEXT = 1 << 30  # a JSON member larger than this is not one torch.export.save wrote for any model surgeon loads
_HINT = "load only .pt2 files written by torch.export.save (surgeon's export); this one was changed or made by hand"


class ProgramArchiveError(SurgeryError):
    """A ``.pt2`` file that is not a program surgeon can load safely."""


def _refuse(path, what: str, hint: str = _HINT):
    raise ProgramArchiveError(f"{path}: {what}", hint=hint) from None


def _members(archive: zipfile.ZipFile, path) -> dict:
    """relative name -> ZipInfo, after checking each name and how it is stored."""
    root, members = None, {}
    for info in archive.infolist():
        name = info.filename
        parts = name.split("/")
        if (not all(_PART.fullmatch(p) for p in parts) or any(p in (".", "..") for p in parts)
                or PurePosixPath(name).is_absolute() or len(parts) < 2):
            _refuse(path, f"the member {name!r} is not a plain relative name inside the archive's folder")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            _refuse(path, f"the member {name!r} is compressed or encrypted (torch.export.save stores members as they are)")
        if root is None:
            root = parts[0]
        if parts[0] != root:
            _refuse(path, f"the members are not all in one folder ({root!r} and {parts[0]!r})")
        relative = "/".join(parts[1:])
        if relative in members:
            _refuse(path, f"the member {name!r} appears twice (which copy a reader takes is not defined)")
        members[relative] = info
    return members


def _text(archive, members, name: str, path) -> str:
    info = members[name]
    if info.file_size > _MAX_TEXT:
        _refuse(path, f"{name} is {info.file_size} bytes, too large for what torch.export.save writes there")
    try:
        return archive.read(info).decode("utf-8")
    except UnicodeDecodeError:
        _refuse(path, f"{name} is not UTF-8 text")


def _json(archive, members, name: str, path):
    try:
        return json.loads(_text(archive, members, name, path))
    except (ValueError, RecursionError) as exc:  # the decoder's own depth bound: nested past ~1000 levels
        _refuse(path, f"{name} is not valid JSON ({exc})")


def _payloads(archive, members, config_name: str, folder: str, prefix: str, path) -> set:
    """The payload files a weights or constants config names, after refusing every pickled entry."""
    config = _json(archive, members, config_name, path)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        _refuse(path, f"{config_name} is not a payload config (an object with a 'config' object)")
    files = set()
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            _refuse(path, f"{config_name}: the entry {fqn!r} does not name its payload file")
        name = entry["path_name"]
        if entry.get("use_pickle") is not False or not name.startswith(prefix) or not isinstance(entry.get("tensor_meta"), dict):
            _refuse(path, f"{config_name}: {fqn!r} is stored as a pickle or an object ({name!r}), not as raw tensor data",
                    hint="unpickling it would run code from the file; surgeon loads only raw tensors")
        if folder + name not in members:
            _refuse(path, f"{config_name}: {fqn!r} names {folder + name}, which the archive does not hold")
        files.add(folder + name)
    return files


def _check_sample_inputs(archive, members, path) -> None:

    data = archive.read(members[SAMPLE_INPUTS])
    if not data:  # torch reads an empty member as "no sample inputs"
        return
    try:
        inputs = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # any failure here is one torch would answer with weights_only=False
        _refuse(path, f"{SAMPLE_INPUTS} is not plain tensor data ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                hint="its pickle needs code to load, which surgeon never runs; re-export the program")
    if not isinstance(inputs, (tuple, dict)):
        _refuse(path, f"{SAMPLE_INPUTS} holds a {type(inputs).__name__}, not the (args, kwargs) torch.export.save writes")


def check_archive(file, path) -> dict:
    """Check an open ``.pt2`` file (see the module docstring); return its extra files (name -> text)."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        _refuse(path, f"not a .pt2 program (not a zip archive: {exc})", hint="give a file written by surgeon's export()")
    with archive:
        members = _members(archive, path)
        missing = [m for m in REQUIRED if m not in members]
        if missing:
            _refuse(path, f"not a .pt2 program of torch.export.save's format: it lacks {missing[0]}")
        for name, value in (("archive_format", "pt2"), ("archive_version", "0")):
            if archive.read(members[name]) != value.encode():
                _refuse(path, f"{name} is not {value!r}: not the program format this torch reads")
        allowed = set(FIXED)
        allowed |= _payloads(archive, members, WEIGHTS_CONFIG, WEIGHTS_DIR, "weight_", path)
        allowed |= _payloads(archive, members, CONSTANTS_CONFIG, CONSTANTS_DIR, "tensor_", path)
        extras = {name[len(EXTRA_DIR):]: name for name in members if name.startswith(EXTRA_DIR)}
        unknown = sorted(set(members) - allowed - set(extras.values()))
        if unknown:
            _refuse(path, f"the member {unknown[0]!r} is not part of a saved program "
                          "(torch would load it as a pickle, compiled code or another program)")
        if SAMPLE_INPUTS in members:
            _check_sample_inputs(archive, members, path)
        check_graph(_json(archive, members, GRAPH, path), f"{path}: {GRAPH}")
        return {short: _text(archive, members, name, path) for short, name in extras.items()}


@contextlib.contextmanager
def _torch_log():
    """Collect (and keep off the console) the exceptions torch.export.load logs before it raises."""
    logger, caught = logging.getLogger("torch.export"), []

    class Catch(logging.Handler):
        def emit(self, record):
            if record.exc_info and record.exc_info[1] is not None:
                caught.append(record.exc_info[1])

    handler, propagate = Catch(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield caught
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def open_program(path):
    """``(program, extra files)`` of the ``.pt2`` file at ``path``, after :func:`check_archive`.

    Any error, from the path to torch's own deserializer, is a :class:`ProgramArchiveError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise ProgramArchiveError(f"{path}: no such file", hint="give the path of a .pt2 file written by export()")
    if path.is_dir():
        raise ProgramArchiveError(f"{path} is a folder, not a .pt2 file", hint="give the path of the .pt2 file itself")
    # The fused ops a lowered program may call, registered before the graph check and torch resolve them by
    # name: the modules the methods' lowering patterns name (a table, so a new method's kernel comes with it).
    for module in kernel_modules():
        importlib.import_module(module)
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise ProgramArchiveError(f"cannot read {path}: {exc.strerror}") from None
    with file:
        extras = check_archive(file, path)
        file.seek(0)
        loaded = {name: "" for name in extras}
        try:
            with _torch_log() as logged:
                program = torch.export.load(file, extra_files=loaded)
        except Exception as exc:
            cause = logged[-1] if logged else exc  # torch logs its deserializer's error, then raises a vaguer one
            text = str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ""
            raise ProgramArchiveError(f"{path}: torch cannot load this program ({type(cause).__name__}: {text})",
                                      hint="was it saved by another torch version, or with ops this process lacks?") from None
    return program, loaded
