"""One way to write files: atomically, so a crash mid-write leaves the previous file intact.

Each file is written to a temporary name in the same folder, flushed to disk,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from surgeon.grammar.diagnostics import SurgeryError

__all__ = ["atomic_path", "write_text", "output_folder", "replace_folder"]


def output_folder(directory) -> Path:
    """``directory`` ready to receive files; a clear error if it is a file or cannot be made."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SurgeryError(f"cannot write into {directory}: it is a file, not a folder", hint="choose another output path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SurgeryError(f"cannot create the folder {directory}: {exc.strerror}") from None
    return directory


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    # Keep the target's suffix: some writers (torch.export.save) check it.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; give what open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_folder(staging, directory) -> None:
    """Put the finished folder ``staging`` at ``directory`` (a sibling), so that ``directory`` holds exactly
    what ``staging`` holds: files an earlier write left there (old shards, an old index) do not survive.
    The old folder is renamed aside, the new one renamed into place, then the old one removed; a crash
    between the two renames leaves both folders whole beside each other."""
    staging, directory = Path(staging), Path(directory)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir would
    if not directory.exists():
        os.replace(staging, directory)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, aside / directory.name)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(aside / directory.name, directory)  # the earlier folder comes back
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
