"""The project's own promises: layout, CI = README, no torch in the language."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    return re.findall(r"^python3 -m venv .*$", (ROOT / "README.md").read_text(), flags=re.M)


def test_ci_runs_exactly_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines


def test_readme_commands_pin_torch_before_anything_else():
    for command in _readme_commands():
        steps = command.split(" && ")
        installs = [s for s in steps if "pip install" in s]
        assert installs[0].endswith("torch==2.13.0"), command


def test_grammar_imports_no_torch_and_passes_kernels_are_not_top_level(tmp_path):
    code = (
        "import sys, importlib.util\n"
        "import surgeon, surgeon.grammar, surgeon.methods\n"
        "surgeon.parse('match \"x\" apply lora(r=8)')\n"
        "assert 'torch' not in sys.modules\n"
        "for name in ('passes', 'kernels', 'grammar'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
        "import surgeon.passes, surgeon.kernels\n"
    )
    # Run from an empty folder, so the checkout itself is not on sys.path.
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_grammar_ships_with_the_package():
    spec = importlib.util.find_spec("surgeon.grammar")
    folder = Path(spec.origin).parent
    assert (folder / "surgery.lark").is_file()
    assert (folder / "surgery.tmLanguage.json").is_file()


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == set(setuptools["packages"])


def test_the_api_verbs_stay_functions_after_every_module_is_imported():
    """A submodule named like a verb would replace it on the package once imported (``surgeon.plan``)."""
    import importlib
    import pkgutil

    import surgeon

    for info in pkgutil.iter_modules(surgeon.__path__):
        if info.name not in ("__main__",):
            importlib.import_module(f"surgeon.{info.name}")
    for verb in ("plan", "compile", "capture_model", "parse", "load_rules", "open_model"):
        assert callable(getattr(surgeon, verb)) and not isinstance(getattr(surgeon, verb), type(surgeon)), verb


def test_the_version_is_the_one_pyproject_declares():
    import tomllib

    import surgeon
    from surgeon._version import __version__

    assert surgeon.__version__ == __version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
