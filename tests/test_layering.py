"""The core (norms, placements, conversion, diagnostics, kernels) imports only torch, numpy and itself."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import normlab

SRC = Path(normlab.__file__).parent
CORE = (
    "norms",
    "blocks",
    "models",
    "convert",
    "diagnostics",
    "kernels",
    "functional.py",
    "registry.py",
    "init.py",
    "nn.py",
    "__init__.py",
    "_atomic.py",
)
ALLOWED_THIRD_PARTY = {"torch", "numpy"}
# The Triton kernels (issue: "imported only when CUDA and Triton are present") are the one
# optional import of the core, confined to this package.
TRITON_PACKAGE = SRC / "kernels" / "gpu"


def _core_files() -> list[Path]:
    files = []
    for entry in CORE:
        path = SRC / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return files


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_core_imports_only_torch_numpy_and_core() -> None:
    core_modules = {f"normlab.{e.removesuffix('.py')}" for e in CORE if e != "__init__.py"}
    offenders = []
    for path in _core_files():
        for name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or name == "normlab":
                continue
            if top == "triton" and path.is_relative_to(TRITON_PACKAGE):
                continue
            if top == "normlab" and any(name == m or name.startswith(m + ".") for m in core_modules):
                continue
            offenders.append(f"{path.relative_to(SRC)} imports {name}")
    assert not offenders, offenders


def test_the_check_sees_the_core() -> None:
    """Guard against a vacuous pass: the core files exist and their imports are parsed."""
    files = _core_files()
    assert any(f.name == "batch_norm.py" for f in files)
    assert "torch" in _imports(SRC / "norms" / "batch_norm.py")


def test_importing_normlab_does_not_import_triton() -> None:
    """Triton loads only when a CUDA tensor first reaches a fused op (normlab.kernels._gpu)."""
    code = (
        "import sys, torch, normlab, normlab.kernels, normlab.kernels.gpu\n"
        "x = torch.randn(4, 8)\n"
        "normlab.DyT(8)(x); normlab.RMSNorm(8)(x)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    env = {**os.environ, "NORMLAB_KERNELS": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
