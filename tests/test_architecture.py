"""The shape of the package (docs/design.md §5): the imports between its modules form no cycle,
lazy imports inside functions included, and kernels/ is a leaf of device code that imports only
Triton, the standard library and the contract."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict:
    """Module name -> source path, kernels/ under its installed name fusedlora.kernels."""
    found = {}
    for folder, package in ((ROOT / "fusedlora", "fusedlora"), (ROOT / "kernels", "fusedlora.kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set:
    """The package's own modules that `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            # `from package import submodule` needs the submodule, not what the package defines.
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        imported |= {target for target in targets if target in modules and target != name}
    return imported


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_kernels_import_only_triton_the_standard_library_and_the_contract():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("fusedlora.kernels"):
            continue
        own = {target for target in _imports(name, path, modules)}  # the package's modules, relative ones resolved
        assert all(t.startswith("fusedlora.kernels") or t == "fusedlora.contract" for t in own), (name, own)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [node.module]
            else:
                continue
            for root in roots:
                top = root.split(".")[0]
                assert top == "triton" or top in sys.stdlib_module_names or root == "fusedlora.contract", (name, root)


def test_the_graph_sees_lazy_and_relative_imports():
    """The checks above would pass on a graph that missed imports: it must see these."""
    graph = _graph()
    assert "fusedlora.backends.triton_launch" in graph["fusedlora.backends.triton"]  # inside a function
    assert "fusedlora.kernels.forward" in graph["fusedlora.backends.triton_launch"]  # from ..kernels.forward
    assert "fusedlora.contract" in graph["fusedlora.kernels.dequant"]
    assert "fusedlora.extension" in graph["fusedlora.backends.cuda"]  # from .. import extension
