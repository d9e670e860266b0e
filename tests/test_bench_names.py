"""bench/ scripts run with bench/ first on sys.path, so a file there named like a package shadows it for
every library the script imports (bench/kernels.py once broke peft's and bitsandbytes' `import kernels`)."""

import importlib.metadata
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Imported by the dependencies only when installed (transformers, peft and bitsandbytes try them), so
# named here: they need not be installed for a bench file of their name to break a machine that has them.
OPTIONAL_IMPORTS = {"kernels", "triton", "bitsandbytes", "peft", "accelerate", "flash_attn", "xformers", "deepspeed", "apex",
                    "torchao", "optimum", "sentencepiece", "tokenizers", "safetensors", "numpy"}


def _importable_names(folder: Path) -> set:
    """What `import NAME` finds in ``folder``: modules and regular packages (a folder without
    __init__.py is a namespace portion, which an installed package of the same name wins over)."""
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}


def test_no_bench_file_shadows_a_package_the_dependencies_import():
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions()) | OPTIONAL_IMPORTS
    assert "fused_kernels" in _importable_names(BENCH)  # the check sees the scripts
    assert sorted(_importable_names(BENCH) & taken) == []
