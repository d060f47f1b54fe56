"""The package's folders say which process runs each file, and its imports keep to that.

Read from the source (every import, at module level and inside functions), not from a run:
- no import circle anywhere in ``server/pe_rank``;
- each folder imports only the folders below it (``core`` nothing but itself and the generated
  stubs; nothing imports the CLI);
- the server's and the client's code reaches neither PyTorch nor transformers, however deep
  (``tests/test_install.py`` runs the server's edge on an install without them);
- the README's layout table names every folder and top-level module there is, and nothing else.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "server" / "pe_rank"
EXPORT = ROOT / "export" / "pe_rank_export"  # the exporter; the server reads configs with its typed reader
GENERATED = ("v1", "tei")  # protobuf stubs made by `make protos`
HEAVY = ("torch", "transformers", "safetensors", "peft", "onnx", "onnxruntime", "tensorrt")

# folder -> the folders (and generated stubs) its modules may import
ALLOWED = {
    "core": {"core", "v1"},
    "runtime": {"core", "runtime"},
    "triton_backend": {"core", "runtime", "triton_backend"},
    "service": {"core", "service", "v1", "tei", "export:configs", "export:shm"},
    "client": {"core", "v1"},
    "training": {"core", "runtime", "training"},
    "models": {"core", "runtime", "training", "models"},
    "tools": {"core", "runtime", "service", "client", "models", "tools", "v1", "export:repository"},
    "cli": {"core", "runtime", "service", "client", "models", "tools", "training"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    base = PACKAGE.parent if path.is_relative_to(PACKAGE) else EXPORT.parent
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {}
    for root in (PACKAGE, EXPORT):
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).parts
            if rel[0] not in GENERATED and "__pycache__" not in rel:
                found[module_name(path)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module this file imports, anywhere in it (relative imports resolved; submodules found)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, name, known) for name, path in found.items()}


def folder(module: str) -> str:
    """pe_rank's folder of a module (``core``, ``service`` ...); ``export:NAME`` for the exporter's modules."""
    parts = module.split(".")
    if parts[0] == "pe_rank_export":
        return f"export:{parts[1]}" if len(parts) > 1 else "export:"
    return parts[1] if len(parts) > 1 else ""


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        todo += [w for w in edges.get(v, ()) if w in edges]
    return seen


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_even_inside_functions():
    edges = graph()
    assert len(edges) > 40, "the package was not found"
    assert cycles(edges) == []


def test_each_folder_imports_only_the_folders_below_it():
    wrong = []
    for module, targets in graph().items():
        if not module.startswith("pe_rank."):
            continue
        source = folder(module)
        for target in targets:
            if not target.startswith(("pe_rank.", "pe_rank_export.")) or folder(target) == source:
                continue
            if folder(target) not in ALLOWED.get(source, set()):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_nothing_imports_the_cli():
    edges = graph()
    assert [m for m, targets in edges.items() if "pe_rank.cli" in targets and m != "pe_rank.__main__"] == []


def test_the_server_and_the_client_never_reach_torch():
    edges = graph()
    for entry in ("pe_rank.service.server", "pe_rank.service.cli", "pe_rank.client", "pe_rank.core.embeddings"):
        closure = reachable(edges, entry)
        heavy = sorted({f"{m} -> {t}" for m in closure for t in edges[m] if t.split(".")[0] in HEAVY})
        assert heavy == [], entry
        assert not any(folder(m) == "runtime" for m in closure), sorted(closure)


def test_the_readme_layout_table_matches_the_package():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("\n## ", readme.index("## Layout") + 3)]
    named = set(re.findall(r"`server/pe_rank/([\w.]+/?)", table)) - {g + "/" for g in GENERATED}
    present = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
               if p.name not in ("__pycache__", "__init__.py", "__main__.py") and not p.name.startswith(".")
               and (p.is_dir() or p.suffix == ".py") and p.name not in GENERATED}
    assert named == present, f"README names {sorted(named - present)} that are not there; misses {sorted(present - named)}"


def test_importing_the_server_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys, pe_rank.service.server, pe_rank.service.cli, pe_rank.client; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
