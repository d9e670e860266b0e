"""Output folders (``-o OUT``): made whole beside OUT, then put in its place in one step.

What a command writes goes into a staging folder, ``.OUT.surgeon-staging-*``,
a sibling of OUT; only when every file is written does it replace OUT
(:func:`surgeon.atomic.replace_folder`). So OUT is at every moment
either the earlier output, whole, or the new one, whole: a failed, interrupted
(Ctrl-C) or killed run leaves the earlier OUT as it was, and at most a staging
folder that the next run into OUT removes. Files from an earlier run never
survive into the new output (an old ``adapter/math/`` is not read back).

One run at a time: a run holds a lock on ``.OUT.surgeon-lock`` (a sibling of
OUT, removed when the run ends; the system releases the lock when the process
ends, however it ends, so a killed run's file only names it), and a second run
into the same OUT is refused, naming the first.

Nothing a user had is lost: OUT must be missing, empty, or surgeon's own
earlier output (``.surgeon-output.json`` lists every file it wrote; an output
from before that record is recognised by its plan.json and surgeon's names
alone). A file in OUT that surgeon did not write is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from surgeon.atomic import replace_folder, write_error, write_text
from surgeon.diagnostics import SurgeryError, render

__all__ = ["MARKER", "OutputFolder", "check_free_space"]

MARKER = ".surgeon-output.json"
# What `surgeon compile` wrote before outputs carried the marker: plan.json and these names only.
_EARLIER_COMPILE = {"plan.json", "adapter", "program.pt2", "merged", "merged.pt2", "fold_report.json"}

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; one run at a time is then the user's to keep
    fcntl = None


class OutputFolder:
    """``with OutputFolder(out, "compile") as folder:`` write into ``folder.staging``, then ``folder.commit()``.

    Entering checks OUT (a file, foreign files, another run's lock) and makes the staging folder, so a path
    that cannot be written fails before any work; leaving removes the staging folder if it was not committed.
    """

    def __init__(self, out, command: str):
        self.out = Path(os.path.realpath(os.path.abspath(os.fspath(out))))  # a link to a folder: write where it leads
        self.command = command
        self.staging: Path | None = None
        self._lock = None

    # --- entering ------------------------------------------------------------------------

    def __enter__(self) -> "OutputFolder":
        out = self.out
        if out.parent == out:
            raise SurgeryError(f"cannot write into {out}: it is the root of the filesystem", hint="choose an output folder")
        if out.exists() and not out.is_dir():
            raise SurgeryError(f"cannot write into {out}: it is a file, not a folder", hint="choose another output path")
        self._make_parent()
        self._take_lock()
        try:
            self._recover()
            self._refuse_foreign()
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.surgeon-staging-{os.getpid()}-", dir=out.parent))
            except OSError as exc:
                raise _cannot(out.parent, exc) from None
        except BaseException:
            self._release()
            raise
        return self

    def _make_parent(self) -> None:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _cannot(self.out.parent, exc) from None

    def _take_lock(self) -> None:
        path = self.out.parent / f".{self.out.name}.surgeon-lock"
        while True:
            try:
                handle = open(path, "a+", encoding="utf-8")
            except OSError as exc:
                raise _cannot(self.out.parent, exc) from None
            if fcntl is None:
                break
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise SurgeryError(f"another surgeon run is writing {self.out}: {holder}",
                                   hint="wait for it to finish, or give another -o") from None
            try:  # the run before removed the file while this one opened it: lock the file now at the path
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"surgeon {self.command}, process {os.getpid()}\n")
        handle.flush()
        self._lock, self._lock_path = handle, path

    def _recover(self) -> None:
        """Remove what killed runs left (no run holds them: this one holds the lock). A run killed between
        the two renames of replace_folder's fallback left OUT missing and the earlier output aside: restore it."""
        parent, name = self.out.parent, self.out.name
        if not self.out.exists():
            for aside in sorted(parent.glob(f".{glob.escape(name)}.old.*")):
                if (aside / name).is_dir():
                    os.replace(aside / name, self.out)
                    break
        for stale in [*parent.glob(f".{glob.escape(name)}.surgeon-staging-*"), *parent.glob(f".{glob.escape(name)}.old.*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def _refuse_foreign(self) -> None:
        if not self.out.is_dir():
            return
        foreign = sorted(set(_files(self.out)) - self._ours())
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise SurgeryError(f"{self.out} holds files surgeon did not write: {shown}",
                               hint="surgeon replaces OUT whole: give a new or empty folder, or move those files out")

    def _ours(self) -> set:
        """The files of OUT that surgeon's earlier output wrote (by its marker, or, without one, an earlier compile)."""
        try:
            record = json.loads((self.out / MARKER).read_text(encoding="utf-8"))
            return {MARKER, *(str(f) for f in record["files"])}
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            pass
        top = {p.name for p in self.out.iterdir()}
        if "plan.json" in top and top <= _EARLIER_COMPILE:
            return set(_files(self.out))
        return set()

    # --- leaving ---------------------------------------------------------------------------

    def commit(self) -> None:
        """Record what the staging folder holds and put it in OUT's place. Ctrl-C waits until it is done."""
        record = {"written_by": "surgeon", "command": self.command, "files": sorted(_files(self.staging))}
        write_text(self.staging / MARKER, json.dumps(record, indent=2) + "\n")
        with _no_interrupt():
            try:
                replace_folder(self.staging, self.out)
            except OSError as exc:
                raise _cannot(self.out, exc) from None
        self.staging = None

    def __exit__(self, kind, error, traceback) -> None:
        staging, self.staging = self.staging, None
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        self._release()
        if isinstance(error, SurgeryError) and staging is not None:  # name OUT, where the user looks, not staging
            error.diagnostics = [replace(d, message=d.message.replace(str(staging), str(self.out))) for d in error.diagnostics]
            error.args = (render(error.diagnostics),)

    def _release(self) -> None:
        if self._lock is not None:
            # Removed while still held: a run waiting on this file finds another at the path and tries again.
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            self._lock.close()  # closing releases the flock
            self._lock = None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes (an estimate) into ``folder`` when the disk has less free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the writers still fail cleanly
    if free < needed:
        raise SurgeryError(f"not enough free space for {what} in {folder}: about {_size(needed)} needed, {_size(free)} free",
                           hint="free some space, or give an -o on another disk")


def _files(folder: Path) -> list:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()]


def _cannot(path: Path, exc: OSError) -> SurgeryError:
    error = write_error(exc, path)
    return error if error is not None else SurgeryError(f"cannot write {path}: {exc}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def _no_interrupt():
    """SIGINT held back (delivered after) while OUT is replaced, so that Ctrl-C cannot split the swap."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
