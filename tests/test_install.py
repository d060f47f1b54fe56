"""The core install (`pip install pe-rank-service`, no extras) is enough for every Triton model.

A Triton container only needs what model_repository/*/1/model.py import. Instead of a new
virtualenv (minutes), a folder of links to the files of the core requirements' distributions
(found from the installed metadata, extras left out) stands in for the core install; each
model.py, and every module it imports inside its functions (pe_llm imports torch and
pe_rank.core in ``initialize``), is imported by a Python that sees only that folder, the
project's source and Triton's backend utilities.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(ROOT.glob("model_repository/*/1/model.py"))
DIST = "pe-rank-service"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_distributions() -> set[str]:
    """The project and everything its requirements pull in, extras left out."""
    seen: set[str] = set()
    todo = [DIST]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def core_site(folder: Path) -> Path:
    """A site-packages of links to the core distributions' files only: the core install, in seconds."""
    core = core_distributions() - {_norm(DIST)}  # the project itself comes from the source tree
    site = folder / "site-packages"
    site.mkdir()
    for dist in metadata.distributions():
        if _norm(dist.metadata["Name"]) not in core:
            continue
        for top in {f.parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top not in ("..", "__pycache__") and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return site


def imports_of(path: Path) -> list[str]:
    """Every module model.py imports, at module level and inside its functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


# -I -S: no site-packages, no PYTHONPATH; the child sees the standard library, the core
# site-packages, the project's source and Triton's triton_python_backend_utils, nothing else.
_CHILD = r"""
import importlib, importlib.util, json, sys
site, source, backend_dir, path, names = json.loads(sys.argv[1])
sys.path[:0] = [site, source, backend_dir]
spec = importlib.util.spec_from_file_location("model", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for name in names:
    importlib.import_module(name)
print("imported", len(names))
"""


def _backend_dir() -> str:
    import pytriton

    found = sorted(Path(pytriton.__file__).parent.glob("tritonserver/backends/python/triton_python_backend_utils.py"))
    assert found, "triton_python_backend_utils.py not found in the nvidia-pytriton wheel"
    return str(found[0].parent)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return core_site(tmp_path_factory.mktemp("core"))


def _run_child(site: Path, model: Path, names: list[str]) -> subprocess.CompletedProcess:
    args = [str(site), str(ROOT / "server"), _backend_dir(), str(model), names]
    return subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, json.dumps(args)],
                          capture_output=True, text=True, timeout=300, cwd=model.parent)


def test_the_core_site_has_no_extras(site):
    present = {p.name for p in site.iterdir()}
    for extra_module in ("grpc", "tritonclient", "fastapi", "uvicorn", "onnxruntime", "peft", "matplotlib",
                         "prometheus_client", "cohere", "pytriton", "gguf", "accelerate"):
        assert extra_module not in present, extra_module
    for core_module in ("torch", "transformers", "numpy", "jinja2", "tokenizers", "safetensors"):
        assert core_module in present, core_module
    # the isolation is real: the child cannot import a server-only module
    probe = _run_child(site, MODELS[0], ["pe_rank.service.app"])
    assert probe.returncode != 0 and "No module named 'grpc'" in probe.stderr, probe.stderr[-2000:]


@pytest.mark.parametrize("model", MODELS, ids=[m.parts[-3] for m in MODELS])
def test_core_install_imports_every_triton_model(site, model):
    assert len(MODELS) >= 4
    names = [n for n in imports_of(model) if n != "triton_python_backend_utils"]
    proc = _run_child(site, model, names)
    assert proc.returncode == 0, proc.stderr[-3000:]
