"""One way to write files: atomically, so a crash mid-write leaves the previous file intact.

Each file is written to a temporary name in the same folder, flushed to disk,
then renamed over the target (``os.replace`` is atomic on POSIX and Windows).
A write that fails (a full disk, a read-only folder, a file-size limit) is a
SurgeryError naming the file, whichever writer failed: Python's, safetensors'
(Rust) or torch.export's (C++, which cannot fail cleanly on a file path, so it
is given a Python file that records the first error instead; see
:func:`save_exported`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

from surgeon.diagnostics import SurgeryError

__all__ = ["atomic_path", "write_text", "output_folder", "replace_folder", "save_exported", "write_error", "writing",
           "WriteError"]


class WriteError(SurgeryError, OSError):
    """A write that failed: a SurgeryError with message and hint, and still the OSError it was (``errno``)."""

    def __init__(self, message: str, hint: str, code: int | None = None):
        super().__init__(message, hint=hint)
        self.errno = code


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


def write_error(exc: BaseException, target) -> WriteError | None:
    """The WriteError for a failed write of ``target``, or None when ``exc`` is not a failed write (or is one already).

    safetensors reports an OS error as SafetensorError("... I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, SurgeryError):
        return None
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        code = exc.errno
    elif type(exc).__name__ == "SafetensorError" and "os error" in str(exc):
        reason, code = str(exc).rsplit(": ", 1)[-1].split(" (os error")[0], None
        for name in ("ENOSPC", "EFBIG", "EROFS", "EACCES", "EDQUOT"):
            if f"os error {getattr(errno, name, -1)})" in str(exc):
                code = getattr(errno, name)
    else:
        return None
    hint = {errno.ENOSPC: "free some space, or write to another disk",
            errno.EFBIG: "the file is larger than this filesystem (or a ulimit -f) allows",
            errno.EROFS: "the filesystem is read-only: choose another output path",
            errno.EACCES: "choose a folder you can write to"}.get(code, "check the output path and the free space")
    if code == getattr(errno, "EDQUOT", None):
        hint = "your disk quota is used up"
    return WriteError(f"cannot write {target}: {reason}", hint=hint, code=code)


@contextlib.contextmanager
def writing(target):
    """A failed write inside becomes the SurgeryError of :func:`write_error`, naming ``target``."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, target)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    with writing(target):
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


class _Recording(io.RawIOBase):
    """A file for torch.export.save that never raises: its C++ writer finishes the archive in a destructor,
    and an error there terminates the process (exit 134). The first OSError is kept and raised afterwards."""

    def __init__(self, file):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.file.seekable()

    def tell(self) -> int:
        return self.file.tell()

    def seek(self, offset, whence=io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as exc:
                self.error = exc
        return size  # what the writer expects, so that it carries on to its end without throwing


def save_exported(program, target, extra_files: dict | None = None) -> None:
    """``torch.export.save(program, target)``, atomically, and a SurgeryError (not an abort) when the write fails."""
    import torch  # here only: the ground floor stays importable without torch, as the language is


    with atomic_path(target) as tmp:
        with open(tmp, "wb") as file:
            sink = _Recording(file)
            torch.export.save(program, sink, extra_files=extra_files)
            if sink.error is None:
                with contextlib.suppress(OSError):
                    file.flush()
                    os.fsync(file.fileno())
        if sink.error is not None:
            raise sink.error


def replace_folder(staging, directory) -> None:
    """Put the finished folder ``staging`` at ``directory`` (a sibling), so that ``directory`` holds exactly
    what ``staging`` holds: files an earlier write left there (old shards, an old index) do not survive.

    Where the system can (Linux's renameat2), the two folders are exchanged in one step and the old one,
    now at ``staging``, removed: ``directory`` is at every moment either the old folder or the new one.
    Elsewhere the old folder is renamed aside (``.NAME.old.*``), the new one renamed into place, then the
    old one removed; a crash between the two renames leaves the old folder whole in the aside folder."""
    staging, directory = Path(staging), Path(directory)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir would
    if not directory.exists():
        os.replace(staging, directory)
        return
    if _exchange(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # an old C library
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0  # EINVAL (a filesystem without exchange) and the like: fall back to two renames
