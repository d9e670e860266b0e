"""Output folders under hostile conditions: a reused, foreign, locked, unwritable or full OUT; Ctrl-C and kill -9.

The promise (surgeon/checkpoints/output_folder.py): OUT is either the earlier output, whole, or the new one, whole; files
surgeon did not write are refused, never replaced; every failure is one error line and a hint, no traceback.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgeon.cli import main
from surgeon.checkpoints.output_folder import MARKER, OutputFolder

ROOT = Path(__file__).resolve().parents[2]
LLAMA = ""  # set by the fixture rules
ONE = "match role(attn.q) apply lora(r=2)\n"
TWO = ONE + 'adapter "math" {\n  match role(attn.v, mlp.down) apply lora(r=4)\n}\n'  # adapters default and math


def _contents(folder: Path) -> dict:
    """relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, rules):
    """An OUT that an earlier `surgeon compile` wrote (the llama rules: adapters default and math)."""
    out = tmp_path_factory.mktemp("earlier") / "out"
    assert main(["compile", "demo:llama", LLAMA, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module", autouse=True)
def rules(tmp_path_factory):
    """LLAMA: a rules file of two adapters for demo:llama (default and math)."""
    global LLAMA
    LLAMA = str(tmp_path_factory.mktemp("rules") / "two.surgery")
    Path(LLAMA).write_text(TWO)


def _copy(earlier: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    return out


def test_a_reused_out_holds_exactly_the_new_output(earlier, tmp_path, capsys):
    out = _copy(earlier, tmp_path)
    assert (out / "adapter" / "math").is_dir()
    (tmp_path / "one.surgery").write_text(ONE)
    assert main(["compile", "demo:llama", str(tmp_path / "one.surgery"), "-o", str(out)]) == 0
    assert sorted(_contents(out)) == [MARKER, "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                      "plan.json", "program.pt2"]  # the earlier adapter/math/ is gone
    assert json.loads((out / MARKER).read_text())["files"] == sorted(set(_contents(out)) - {MARKER})
    assert _leftovers(out) == []  # no staging folder, no lock file


@pytest.mark.parametrize("foreign", ["notes.txt", "adapter/notes.txt"])
def test_files_surgeon_did_not_write_are_refused_and_kept(earlier, tmp_path, capsys, monkeypatch, foreign):
    out = _copy(earlier, tmp_path)
    (out / foreign).write_text("mine")
    before = _contents(out)
    monkeypatch.setattr("surgeon.compile", _never)  # refused before any work
    assert main(["compile", "demo:llama", LLAMA, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: {out} holds files surgeon did not write: {foreign}\n" in err and "hint: " in err
    assert _contents(out) == before and _leftovers(out) == []


def test_a_folder_of_other_files_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    monkeypatch.setattr("surgeon.compile", _never)
    assert main(["compile", "demo:llama", LLAMA, "-o", str(tmp_path / "home")]) == 1
    assert "holds files surgeon did not write: thesis.tex" in capsys.readouterr().err
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


def _never(*args, **kwargs):
    raise AssertionError("compiled although OUT was refused")


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr("surgeon.compile", _never)
    with OutputFolder(out, "compile"):  # another run holds OUT (flock: another open file, so this process too)
        assert main(["compile", "demo:llama", LLAMA, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: another surgeon run is writing {out}: surgeon compile, process {os.getpid()}" in err
    assert not out.exists() and _leftovers(out) == []


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: chmod 0o555, or as root (which chmod does not stop) /sys."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        os.mkdir("/sys/surgeon-probe")
    except OSError:
        return Path("/sys")
    os.rmdir("/sys/surgeon-probe")
    pytest.skip("no folder this root process cannot write to")


def test_an_unwritable_out_fails_before_compiling(tmp_path, capsys, monkeypatch):
    parent = _unwritable(tmp_path)
    monkeypatch.setattr("surgeon.compile", _never)
    assert main(["compile", "demo:llama", LLAMA, "-o", str(parent / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: cannot write {parent}") and err[1].startswith("hint: ") and len(err) == 2


def test_too_little_free_space_is_refused_before_writing(earlier, tmp_path, capsys, monkeypatch):
    import shutil

    out = _copy(earlier, tmp_path)
    before = _contents(out)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("surgeon.checkpoints.output_folder.shutil.disk_usage", lambda path: usage._replace(free=100_000))
    assert main(["compile", "demo:llama", LLAMA, "-o", str(out), "--fold"]) == 1
    err = capsys.readouterr().err
    assert f"error: not enough free space for {out} in {tmp_path}: about " in err and "97.7 KiB free" in err
    assert _contents(out) == before and _leftovers(out) == []


def test_a_full_disk_while_saving_the_merged_checkpoint_is_an_error(earlier, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = _copy(earlier, tmp_path)
    before = _contents(out)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    assert main(["compile", "demo:llama", LLAMA, "-o", str(out), "--fold"]) == 1
    err = capsys.readouterr().err
    assert "error: cannot write " in err and "/merged: No space left on device\nhint: free some space" in err
    assert "Traceback" not in err and _contents(out) == before and _leftovers(out) == []


_SAVE_UNDER_A_SIZE_LIMIT = """
import resource, signal, torch
from surgeon.atomic import save_exported
from surgeon.grammar import SurgeryError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG), as on a full disk
program = torch.export.export(torch.nn.Linear(300, 300), (torch.randn(2, 300),))
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
try:
    save_exported(program, "program.pt2")
except SurgeryError as error:
    print(error)
"""


def test_a_program_that_does_not_fit_is_an_error_not_an_abort(tmp_path):
    # torch.export.save to a path aborts the process here (a C++ exception in a destructor, exit 134)
    done = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_SIZE_LIMIT], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error: cannot write program.pt2: File too large" in done.stdout
    assert sorted(os.listdir(tmp_path)) == []  # no temporary file left


_RUN = "import sys; from surgeon.cli import main; sys.exit(main(sys.argv[1:]))"


def _start(out: Path, *extra, preexec=None):
    return subprocess.Popen([sys.executable, "-c", _RUN, "compile", "demo:llama", LLAMA, "-o", str(out), *extra],
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def _when_staging_holds(out: Path, name: str, process, limit: float = 180.0) -> None:
    started = time.monotonic()
    while not list(out.parent.glob(f".{out.name}.surgeon-staging-*/{name}")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() - started < limit, "the run never reached its writes"
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_an_interrupted_or_killed_run_leaves_the_earlier_out_whole(earlier, tmp_path, how, capsys):
    out = _copy(earlier, tmp_path)
    before = _contents(out)
    process = _start(out, "--fold")
    _when_staging_holds(out, "plan.json", process)  # the new plan is written, beside the old program.pt2
    process.send_signal(how)
    stdout, stderr = process.communicate(timeout=120)
    assert _contents(out) == before
    if how == signal.SIGINT:
        assert process.returncode == 130
        assert stderr.strip().splitlines()[-1] == "surgeon: interrupted" and "Traceback" not in stderr
        assert _leftovers(out) == []
    else:
        assert process.returncode == -signal.SIGKILL
        assert any(".surgeon-staging-" in name for name in _leftovers(out))
        (tmp_path / "one.surgery").write_text(ONE)  # the next run removes what the killed one left
        assert main(["compile", "demo:llama", str(tmp_path / "one.surgery"), "-o", str(out)]) == 0
        assert _leftovers(out) == [] and "adapter/math/adapter_config.json" not in _contents(out)


@pytest.mark.skipif("save_exported" not in (ROOT / "surgeon" / "checkpoints" / "program.py").read_text(),
                    reason="program.py still saves through torch.export.save(path), which aborts when a write fails")
def test_a_write_that_fails_during_compile_fold_is_one_error_line(earlier, tmp_path):
    out = _copy(earlier, tmp_path)
    before = _contents(out)

    def limited():  # a real failed write (EFBIG) of the first big file, program.pt2 (about 5.6 MB)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, resource.RLIM_INFINITY))

    process = _start(out, "--fold", preexec=limited)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr and "error: cannot write " in stderr
    assert _contents(out) == before and _leftovers(out) == []


def test_merge_names_outside_out_are_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    assert main(["merge", "demo:llama", str(tmp_path), f"{elsewhere}/x/m=linear(default=1.0)", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "is not valid" in err and "hint: use letters, digits" in err
    assert not elsewhere.exists() and not (tmp_path / "out").exists()
