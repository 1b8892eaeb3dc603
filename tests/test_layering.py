"""What may import what inside ``src/normlab``: layers that point one way, no cycle, a core of torch
and numpy only. README's Layout section states the same layers; a test checks it does."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import normlab

SRC = Path(normlab.__file__).parent
README = SRC.parents[1] / "README.md"

# Areas (top-level modules and packages of normlab), lowest first. An area may import the areas of
# lower layers only: never its own layer's other areas, never a higher layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("registry", "_atomic", "_reference", "_text", "structure"),
    ("kernels",),
    ("functional",),
    ("norms",),
    ("blocks",),
    ("models",),
    ("convert", "diagnostics"),
    ("__init__",),  # the public API: what `import normlab` gives
    ("data", "summary"),
    ("monitor",),
    ("train",),
    ("studies", "bench", "integrations"),
    ("cli",),
    ("init", "nn", "report", "cli_convert"),  # old paths, kept one release with a DeprecationWarning
)
CORE_TOP = LAYERS.index(("__init__",))  # the core: this layer and below
ALLOWED_THIRD_PARTY = {"torch", "numpy"}
# Optional imports of the core, each confined to one place that `import normlab` never loads:
# Triton in the CUDA kernels (a package imported at the first CUDA call), transformers in the
# Hugging Face builders (inside their functions only).
OPTIONAL = {"triton": (SRC / "kernels" / "gpu", False), "transformers": (SRC / "models" / "hf.py", True)}


@dataclass(frozen=True)
class Import:
    target: str  # a normlab module, or a third-party / stdlib module name
    lazy: bool  # inside a function


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str) -> str:
    """The most specific normlab module that ``name`` names (``normlab.norms.NORMS`` -> ``normlab.norms``)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports(path: Path) -> list[Import]:
    """Every import of ``path``, at any depth (functions and ``if TYPE_CHECKING:`` blocks included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(_resolve(a.name) if a.name.startswith("normlab") else a.name, inner)
                             for a in child.names)  # fmt: skip
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    full = ".".join(base + ([child.module] if child.module else []))
                else:
                    full = child.module or ""
                if full.split(".")[0] != "normlab":
                    found.append(Import(full, inner))
                    continue
                for alias in child.names:
                    sub = f"{full}.{alias.name}"
                    found.append(Import(sub if sub in MODULES else _resolve(full), inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"area {name!r} is in no layer of LAYERS: add it (and to README's Layout)")


def graph() -> dict[str, set[str]]:
    return {
        m: {i.target for i in imports(p) if i.target.startswith("normlab") and i.target != m}
        for m, p in MODULES.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_every_area_is_in_a_layer() -> None:
    areas = {area(m) for m in MODULES}
    for name in areas:
        layer_of(name)
    listed = {a for names in LAYERS for a in names}
    assert listed == areas, f"LAYERS names areas that do not exist: {sorted(listed - areas)}"


def test_no_import_cycle_inside_normlab() -> None:
    found = cycles(graph())
    assert not found, f"import cycles (lazy and TYPE_CHECKING imports count): {found}"


def test_the_cycle_finder_sees_a_cycle() -> None:
    """Guard against a vacuous pass."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_dependencies_point_down_the_layers() -> None:
    offenders = []
    for module, targets in graph().items():
        here = layer_of(area(module))
        for target in targets:
            there = area(target)
            if there == area(module):
                continue
            if layer_of(there) >= here:
                offenders.append(f"{module} imports {target}")
    assert not offenders, offenders


def test_core_imports_only_torch_numpy_and_core() -> None:
    offenders = []
    for module, path in MODULES.items():
        if layer_of(area(module)) > CORE_TOP:
            continue
        for imp in imports(path):
            top = imp.target.split(".")[0]
            if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or top == "normlab":
                continue
            place, lazy_only = OPTIONAL.get(top, (None, False))
            if place is not None and path.is_relative_to(place) and (imp.lazy or not lazy_only):
                continue
            offenders.append(f"{path.relative_to(SRC)} imports {imp.target}")
    assert not offenders, offenders


def test_the_check_sees_the_core() -> None:
    """Guard against a vacuous pass: the core files exist and their imports are parsed."""
    names = {i.target for i in imports(SRC / "norms" / "batch_norm.py")}
    assert "torch" in names and "normlab.norms._base" in names
    lazy = [i for i in imports(SRC / "models" / "hf.py") if i.target == "transformers"]
    assert lazy and all(i.lazy for i in lazy)
    assert "normlab.kernels._dispatch" in graph()["normlab.functional"]


def test_readme_layout_lists_the_same_layers() -> None:
    """README's Layout table: one row per layer, its areas in backticks, lowest first."""
    text = README.read_text()
    section = text[text.index("## Layout") :]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    documented = [tuple(re.findall(r"`([a-z_]+)(?:/|\.py)?`", row.split("|")[1])) for row in rows]
    assert [tuple(sorted(r)) for r in documented] == [tuple(sorted(names)) for names in LAYERS]


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


def test_the_command_line_parser_imports_no_heavy_area() -> None:
    """``normlab list`` starts fast: building the parser imports neither the benchmark, nor
    conversion, nor the studies, nor training."""
    code = (
        "import sys\n"
        "from normlab.cli import build_parser\n"
        "build_parser()\n"
        "heavy = [m for m in ('normlab.bench', 'normlab.studies', 'normlab.train', 'normlab.summary')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
