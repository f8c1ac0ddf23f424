"""The layer rules of the design, as an import contract over the source tree.

Every ``import`` counts, module level or inside a function (a lazy import still ties two
modules together), except those under ``if TYPE_CHECKING:``. Rules (DESIGN.md, "Layer rules"):

* ``fastcore/kernels/`` imports nothing of the package but its own kernels; ``csrc/`` imports no
  Python module;
* ``fastcore.ops`` never imports ``nn``, ``models``, ``train``, ``data`` (nor the hierarchy
  module ``fastcore.graph``, which is built on it);
* ``fastcore.nn`` never imports ``models``, ``train`` or ``_backend``;
* ``fastcore.models`` never imports ``train`` or ``_backend``;
* ``fastcore.data`` never imports ``models`` or ``train``;
* ``fastcore.compat`` (torch_scatter's API) imports ``fastcore.ops`` only: never ``nn``,
  ``graph``, ``models``, ``train``, ``data``, ``_backend`` or ``reference``;
* ``fastcore.reference`` is imported only by the ops (their registration and composites),
  the reference itself and ``fastcore.testing`` (the helpers of tests and benches); nothing
  in the package imports ``fastcore.testing``;
* only ``fastcore.train`` imports ``torch.distributed`` (distributed launch);
* a package's modules import their siblings directly, never through the package's own
  ``__init__`` (that re-export is for users);
* no import cycle anywhere in the package.

The checker runs on the real tree, and on small synthetic trees that rebuild each cycle and
violation the architecture issue named, to show that it would catch them.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (importer prefix, forbidden imported prefix, why)
FORBIDDEN = [
    ("fastcore.ops", "fastcore.nn", "ops never import layers"),
    ("fastcore.ops", "fastcore.models", "ops never import models"),
    ("fastcore.ops", "fastcore.train", "ops never import the training layer"),
    ("fastcore.ops", "fastcore.data", "ops never import data"),
    ("fastcore.ops", "fastcore.graph", "ops never import the hierarchy built on them"),
    ("fastcore.nn", "fastcore.models", "layers never import models"),
    ("fastcore.nn", "fastcore.train", "layers never import the training layer"),
    ("fastcore.nn", "fastcore._backend", "backend policy belongs to the ops"),
    ("fastcore.models", "fastcore.train", "models never import the training layer"),
    ("fastcore.models", "fastcore._backend", "backend policy belongs to the ops"),
    ("fastcore.data", "fastcore.models", "data never imports models"),
    ("fastcore.data", "fastcore.train", "data never imports the training layer"),
    ("fastcore.reference", "fastcore.ops", "the oracle stands alone"),
    ("fastcore.compat", "fastcore.nn", "the torch_scatter API sits on the ops alone"),
    ("fastcore.compat", "fastcore.graph", "the torch_scatter API sits on the ops alone"),
    ("fastcore.compat", "fastcore.models", "the torch_scatter API sits on the ops alone"),
    ("fastcore.compat", "fastcore.train", "the torch_scatter API sits on the ops alone"),
    ("fastcore.compat", "fastcore.data", "the torch_scatter API sits on the ops alone"),
    ("fastcore.compat", "fastcore._backend", "backend policy belongs to the ops"),
]
REFERENCE_USERS = ("fastcore.ops", "fastcore.reference", "fastcore.testing")
DISTRIBUTED = ("torch.distributed", "torch.nn.parallel")
EXTENSION = "fastcore._C"  # built from csrc/


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    tree: ast.AST, module: str, is_package: bool, modules: set[str]
) -> Iterator[tuple[str, int]]:
    """``(imported name, line)`` for every import in ``tree``: ``from a import b`` is an
    import of the module ``a.b`` when there is one, else of ``a`` (a name defined there).
    Parent packages, which Python initialises on the way, are not counted."""
    package = module if is_package else module.rpartition(".")[0]
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                yield (sub if sub in modules else name), node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported package module: first line}}`` for every module under
    ``root/fastcore``, keeping only imports of modules in the tree."""
    files = list(root.glob("fastcore/**/*.py"))
    modules = {_module_name(p, root): p for p in files}
    known = {*modules, EXTENSION}  # the compiled extension: a module without imports
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: dict[str, int] = {}
        for target, line in _imports(tree, name, path.name == "__init__.py", known):
            if (target in modules and target != name) or target.startswith(DISTRIBUTED):
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def violations(root: Path) -> list[str]:
    """Every broken layer rule under ``root``, one line each (empty: all rules hold)."""
    graph = import_graph(root)
    found = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            where = f"{module} (line {line}) imports {target}"
            if target.startswith(DISTRIBUTED):
                if not _under(module, "fastcore.train"):
                    found.append(f"{where}: only fastcore.train knows about distributed launch")
                continue
            if _under(module, "fastcore.kernels") and not _under(target, "fastcore.kernels"):
                found.append(f"{where}: kernels import nothing of the package")
            for importer, forbidden, why in FORBIDDEN:
                if _under(module, importer) and _under(target, forbidden):
                    found.append(f"{where}: {why}")
            if _under(target, "fastcore.reference") and not any(
                _under(module, user) for user in REFERENCE_USERS
            ):
                found.append(f"{where}: only tests, benches and the ops import the reference")
            if _under(target, "fastcore.testing") and module != "fastcore.testing":
                found.append(f"{where}: fastcore.testing is for tests and benches")
            package = module.rpartition(".")[0]
            if target == package and target != "fastcore" and graph.get(target):
                found.append(f"{where}: import the sibling module, not the package")
    for cycle in find_cycles(graph):
        found.append("import cycle: " + " <-> ".join(cycle))
    return found


def test_the_package_keeps_its_layer_rules():
    assert violations(ROOT) == []


def test_csrc_imports_no_python_module():
    pattern = re.compile(r"PyImport_|py::module_?::import|pybind11::module_?::import")
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.glob("csrc/**/*")
        if p.suffix in (".cpp", ".cu", ".h", ".cuh") and pattern.search(p.read_text())
    ]
    assert offenders == []


def test_nn_models_and_compat_import_neither_backend_nor_reference():
    graph = import_graph(ROOT)
    assert "fastcore.compat" in graph
    for module, edges in graph.items():
        if any(_under(module, m) for m in ("fastcore.nn", "fastcore.models", "fastcore.compat")):
            assert not any(
                _under(t, "fastcore._backend") or _under(t, "fastcore.reference") for t in edges
            ), module


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for pkg in ("fastcore", "fastcore/ops", "fastcore/train", "fastcore/nn", "fastcore/models"):
        init = tmp_path / pkg / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text("")
    return tmp_path


# The cycles and violations the architecture issue found, rebuilt in miniature.
BROKEN_TREES = {
    "graph <-> ops.spmm (a lazy import)": (
        {
            "fastcore/graph.py": "from fastcore.ops.spmm import spmm\n",
            "fastcore/ops/spmm.py": "def spmm(x, graph):\n    from fastcore.graph import Graph\n",
        },
        "import cycle: fastcore.graph <-> fastcore.ops.spmm",
    ),
    "resample <-> ops.kv": (
        {
            "fastcore/resample.py": "from fastcore.ops.kv import kv_project\n",
            "fastcore/ops/kv.py": "def f():\n    from fastcore.resample import Resample\n",
        },
        "import cycle: fastcore.ops.kv <-> fastcore.resample",
    ),
    "temporal_align <-> temporal_report": (
        {
            "fastcore/train/temporal_align.py": "from . import temporal_report\n",
            "fastcore/train/temporal_report.py": (
                "def g():\n    from fastcore.train.temporal_align import derangement\n"
            ),
        },
        "import cycle: fastcore.train.temporal_align <-> fastcore.train.temporal_report",
    ),
    "basin_report imports train.__main__, which imports it back": (
        {
            "fastcore/train/__main__.py": "from fastcore.train import basin_report\n",
            "fastcore/train/basin_report.py": "from fastcore.train.__main__ import resolve_config\n",
        },
        "import cycle: fastcore.train.__main__ <-> fastcore.train.basin_report",
    ),
    "a layer owns backend policy": (
        {"fastcore/nn/block.py": "from fastcore import _backend\n", "fastcore/_backend.py": ""},
        "backend policy belongs to the ops",
    ),
    "the torch_scatter API picks a backend": (
        {"fastcore/compat.py": "from fastcore import _backend\n", "fastcore/_backend.py": ""},
        "backend policy belongs to the ops",
    ),
    "the torch_scatter API imports a layer": (
        {"fastcore/compat.py": "from fastcore.nn import pooling\n", "fastcore/nn/pooling.py": ""},
        "the torch_scatter API sits on the ops alone",
    ),
    "a model runs the oracle": (
        {
            "fastcore/models/basin.py": "from fastcore import reference\n",
            "fastcore/reference/__init__.py": "",
        },
        "only tests, benches and the ops import the reference",
    ),
    "a kernel imports the ops": (
        {
            "fastcore/kernels/spmm.py": "from fastcore.ops import _checks\n",
            "fastcore/ops/_checks.py": "",
        },
        "kernels import nothing of the package",
    ),
    "an op imports a layer": (
        {"fastcore/ops/x.py": "import fastcore.nn.pooling\n", "fastcore/nn/pooling.py": ""},
        "ops never import layers",
    ),
    "distributed launch outside train": (
        {"fastcore/nn/ddp.py": "import torch.distributed as dist\n"},
        "only fastcore.train knows about distributed launch",
    ),
    "a sibling through the package": (
        {
            "fastcore/ops/__init__.py": "from fastcore.ops.a import f\n",
            "fastcore/ops/a.py": "def f():\n    pass\n",
            "fastcore/ops/b.py": "from fastcore.ops import f\n",
        },
        "import the sibling module, not the package",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TREES))
def test_the_checker_catches(tmp_path, case):
    files, expected = BROKEN_TREES[case]
    found = violations(_tree(tmp_path, files))
    assert any(expected in line for line in found), found


def test_type_checking_imports_do_not_count(tmp_path):
    root = _tree(
        tmp_path,
        {
            "fastcore/a.py": "from fastcore import b\n",
            "fastcore/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fastcore import a\n",
        },
    )
    assert violations(root) == []


def test_the_repository_root_shadows_no_installed_package():
    """``python -m`` and ``python -m pytest`` put the repository root first on ``sys.path``:
    a package or module there hides an installed one of the same name. A top-level
    ``kernels/`` once hid the PyPI ``kernels`` that transformers >= 5 imports, and every
    transformers-backed job failed when run from the root."""
    from importlib.metadata import packages_distributions

    importable = {
        p.stem if p.is_file() else p.name
        for p in ROOT.iterdir()
        if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert importable - {"setup"} == {"fastcore"}, (
        f"importable from the repository root: {sorted(importable)}; only the fastcore "
        "package (and setup.py) may be"
    )
    owners = packages_distributions()
    clashes = {
        name: owners[name] for name in importable if set(owners.get(name, [])) - {"fastcore"}
    }
    assert not clashes, f"names at the repository root hide installed distributions: {clashes}"
