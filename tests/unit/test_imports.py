"""The import structure of the project packages, checked statically (ast) and, for torch, in a fresh interpreter.

(a) No import cycles between project modules. Every import statement counts, at module level or inside a function
    (a lazy import is a dependency all the same), and so does ``importlib.import_module`` of a literal name (a name
    computed at run time, e.g. from a registry table, cannot be seen statically). Relative imports are resolved; ``from X import Y`` is an import of
    module ``X.Y`` when that is a module file, else of ``X``; an import of a package is an import of its
    ``__init__.py``. Importing ``a.b.c`` is NOT also counted as importing its parent packages: a package's
    ``__init__`` may import its own submodules (Python initialises the package first), so such implicit edges would
    report cycles that cannot occur. Imports of modules outside the project (and of the generated stubs in
    ``cotune/v1``) are not edges. A cycle is a strongly connected component of more than one module (Tarjan).
(b) Layering: the ``cotune`` library imports no service package (coordinator, llm_server, slm_client, alignment),
    and generic code (cotune.rpc, cotune.wire, cotune.data, cotune.lm, cotune.align) imports no algorithm
    (cotune.algorithms).
(c) ``import coordinator.service`` does not import torch: the coordinator never runs a model.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cotune", "coordinator", "llm_server", "slm_client", "alignment")
SKIP = ("cotune.v1",)  # generated protobuf stubs
SERVICE_PACKAGES = ("coordinator", "llm_server", "slm_client", "alignment")
GENERIC = ("cotune.rpc", "cotune.wire", "cotune.data", "cotune.lm", "cotune.align", "cotune.party", "cotune.errors",
           "cotune.tasks")
FRONT_END = "cotune.cli"  # the command line starts the services, so it alone may import them (docs/architecture.md)
ALGORITHMS = "cotune.algorithms"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@dataclass(frozen=True)
class Import:
    names: tuple[str, ...]  # the absolute dotted names this statement imports (X, and X.Y for `from X import Y`)
    target: str | None  # the project module it resolves to (None: outside the project)
    line: int


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            if not any(_within(name, skip) for skip in SKIP):
                modules[name] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import statement of the file, anywhere in it, resolved against the project modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import((alias.name,), alias.name if alias.name in modules else None, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and not node.args[0].value.startswith(".")
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            name = node.args[0].value  # importlib.import_module("a.b") with a literal name is an import too
            found.append(Import((name,), name if name in modules else None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(module, path).split(".")
                if node.level - 1 > len(package) - 1:
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and sub in modules:
                    found.append(Import((base, sub), sub, node.lineno))
                else:
                    found.append(Import((base,), base if base in modules else None, node.lineno))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[int]], dict[str, list[Import]]]:
    """(module -> imported project modules, (a, b) -> lines of a that import b, module -> all its imports)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    lines: dict[tuple[str, str], list[int]] = {}
    all_imports = {}
    for module, path in modules.items():
        all_imports[module] = imports_of(module, path, modules)
        for imp in all_imports[module]:
            if imp.target is not None and imp.target != module:
                graph[module].add(imp.target)
                lines.setdefault((module, imp.target), []).append(imp.line)
    return graph, lines, all_imports


def tarjan_scc(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of a directed graph (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node] & members):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"no cycle through {start} in {component}")


def _relpath(module: str) -> str:
    return str(project_modules()[module].relative_to(ROOT))


# -- the algorithm itself --------------------------------------------------------------------------------------------
def test_tarjan_finds_every_cycle_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"f", "a"}, "g": set()}
    comps = sorted(tarjan_scc(graph))
    assert comps == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]
    assert _shortest_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    chain = {str(i): {str(i + 1)} for i in range(5000)}  # deep: no recursion limit
    chain["5000"] = {"0"}
    assert [len(c) for c in tarjan_scc(chain)] == [5001]


def test_the_scan_sees_lazy_relative_and_from_imports():
    graph, lines, all_imports = import_graph()
    assert len(graph) > 50 and "cotune.errors" in graph and not any(_within(m, "cotune.v1") for m in graph)
    assert "cotune.errors" in graph["cotune.rpc.operations"]  # module level
    assert "cotune.rpc.operations" in graph["cotune.rpc.server"]  # inside a method
    assert "cotune.data.tasks" in graph["cotune.data"]  # relative, in a package __init__
    assert "cotune.wire.safetensors_io" in graph["cotune.algorithms.aggregate"]


# -- (a) cycles ------------------------------------------------------------------------------------------------------
def test_no_import_cycles():
    graph, lines, _ = import_graph()
    cycles = [c for c in tarjan_scc(graph) if len(c) > 1]
    report = []
    for component in sorted(cycles, key=lambda c: (-len(c), c)):
        cycle = _shortest_cycle(graph, component)
        report.append(f"cycle of {len(component)} module(s): {', '.join(component)}")
        report.append("  e.g. " + " -> ".join(cycle))
        for a in component:
            for b in sorted(graph[a] & set(component)):
                report.append(f"    {a} -> {b}  ({_relpath(a)}:{','.join(map(str, sorted(set(lines[(a, b)]))))})")
    print("\n".join(report))
    assert not cycles, "import cycles between project modules:\n" + "\n".join(report)


# -- (b) layering ----------------------------------------------------------------------------------------------------
def test_the_library_imports_no_service_and_generic_code_imports_no_algorithm():
    _, _, all_imports = import_graph()
    violations = []
    for module, imports in sorted(all_imports.items()):
        for imp in imports:
            for name in imp.names:
                if (_within(module, "cotune") and not _within(module, FRONT_END)
                        and any(_within(name, s) for s in SERVICE_PACKAGES)):
                    violations.append(f"{module} ({_relpath(module)}:{imp.line}) imports service package {name}")
                if any(_within(module, g) for g in GENERIC) and _within(name, ALGORITHMS):
                    violations.append(f"{module} ({_relpath(module)}:{imp.line}) imports algorithm code {name}")
    violations = sorted(set(violations))
    print("\n".join(violations))
    assert not violations, "layering violations:\n" + "\n".join(violations)


# -- (c) the coordinator runs without torch ----------------------------------------------------------------------------
def test_the_coordinator_service_does_not_import_torch():
    code = textwrap.dedent("""
        import sys, time, traceback

        chain = []

        class Spy:  # records who imports torch first, and finds nothing itself
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not chain:
                    chain.extend(f"{f.filename}:{f.lineno} ({f.name})" for f in traceback.extract_stack()[:-1]
                                 if not f.filename.startswith("<frozen"))
                return None

        sys.meta_path.insert(0, Spy())
        start = time.perf_counter()
        import coordinator.service
        print(f"import coordinator.service: {time.perf_counter() - start:.3f}s")
        from cotune.algorithms.registry import STRATEGIES  # every strategy and config runs on the coordinator
        assert len(STRATEGIES) >= 9, sorted(STRATEGIES)
        if "torch" in sys.modules:
            print("torch was imported; first import of torch from:\\n  " + "\\n  ".join(chain))
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
