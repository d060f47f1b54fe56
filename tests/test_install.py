"""Each install is what its process needs: the `triton` extra serves every Triton model, the
`server` extra runs the server without PyTorch.

A Triton container only needs what model_repository/*/1/model.py import
(`pip install pe-rank-service[triton]`); a server image only `pe-rank-service[server]`. Instead
of a new virtualenv (minutes), a folder of links to the files of an install's distributions
(found from the installed metadata, other extras left out) stands in for it; each model.py, and
every module it imports inside its functions (pe_llm imports torch and pe_rank.runtime in
``initialize``), is imported by a Python that sees only that folder, the project's source and
Triton's backend utilities; the server's edge (its repository view, tokenizers, validation and
prompts) runs on the server's folder and never loads torch or transformers.
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


def distributions(extras: tuple[str, ...]) -> set[str]:
    """The project and everything its requirements with these extras pull in, other extras left out."""
    seen: set[tuple[str, str]] = set()
    todo = [(DIST, extra) for extra in ("", *extras)]
    while todo:
        name, extra = todo.pop()
        name = _norm(name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *req.extras)]
    return {name for name, _ in seen}


def site_of(folder: Path, extras: tuple[str, ...]) -> Path:
    """A site-packages of links to one install's distributions only: that install, in seconds."""
    core = distributions(extras) - {_norm(DIST)}  # the project itself comes from the source tree
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
    """`pip install pe-rank-service[triton]`: what a Triton container gets."""
    return site_of(tmp_path_factory.mktemp("triton"), ("triton",))


@pytest.fixture(scope="module")
def server_site(tmp_path_factory) -> Path:
    """`pip install pe-rank-service[server]`: what a server image gets."""
    return site_of(tmp_path_factory.mktemp("server"), ("server",))


def _run_child(site: Path, model: Path, names: list[str]) -> subprocess.CompletedProcess:
    args = [str(site), str(ROOT / "server"), _backend_dir(), str(model), names]
    return subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, json.dumps(args)],
                          capture_output=True, text=True, timeout=300, cwd=model.parent)


def test_the_triton_site_has_no_server_extras(site):
    present = {p.name for p in site.iterdir()}
    for extra_module in ("grpc", "tritonclient", "fastapi", "uvicorn", "peft", "matplotlib",
                         "prometheus_client", "cohere", "pytriton", "gguf", "accelerate"):
        assert extra_module not in present, extra_module
    for core_module in ("torch", "transformers", "numpy", "jinja2", "tokenizers", "safetensors", "onnxruntime"):
        assert core_module in present, core_module
    # the isolation is real: the child cannot import a server-only module
    probe = _run_child(site, MODELS[0], ["pe_rank.service.app"])
    assert probe.returncode != 0 and "No module named 'grpc'" in probe.stderr, probe.stderr[-2000:]


@pytest.mark.parametrize("model", MODELS, ids=[m.parts[-3] for m in MODELS])
def test_triton_extra_imports_every_triton_model(site, model):
    assert len(MODELS) >= 4
    names = [n for n in imports_of(model) if n != "triton_python_backend_utils"]
    proc = _run_child(site, model, names)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_core_install_is_torch_free():
    core = distributions(())
    assert not core & {"torch", "transformers", "safetensors", "grpcio"}, sorted(core)
    assert {"numpy", "tokenizers", "jinja2", "sentencepiece"} <= core


# The server's edge on the server install: read the exported repository (tokenizers, sizes),
# validate a request with token counting (truncate=false), build its prompt, and import every
# module `pe-rank serve` runs; then torch, transformers and safetensors must still be unloaded.
_SERVER_CHILD = r"""
import json, sys
site, source, repository, exporter = json.loads(sys.argv[1])
sys.path[:0] = [site, source, exporter]
import pe_rank.service.server, pe_rank.service.cli, pe_rank.service.http_api, pe_rank.service.tei
from pe_rank.service.app import RepositoryView, ServiceConfig, RankingService
from pe_rank.core.types import Passage, RerankRequest
repo = RepositoryView(__import__("pathlib").Path(repository))
config = ServiceConfig(repository=repo, triton_urls=[])
request = RerankRequest(query="how do fleas live", truncate=False,
                        passages=tuple(Passage(id=str(i), text="a flea lives " * (i + 1)) for i in range(3)))
RankingService._validated(type("S", (), {"repo": repo, "config": config})(), lambda: request)
ids, positions = repo.prompts.build(request.query, 3)
assert len(positions) == 3, positions
assert repo.token_counts(["x " * 600])[0] == 513
loaded = sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)
print(json.dumps({"loaded": loaded, "prompt_tokens": len(ids)}))
"""


def test_the_server_install_runs_the_server_edge_without_torch(server_site, exported):
    present = {p.name for p in server_site.iterdir()}
    for heavy in ("torch", "transformers", "safetensors", "pytriton"):
        assert heavy not in present, heavy
    for needed in ("grpc", "tritonclient", "fastapi", "tokenizers", "sentencepiece"):
        assert needed in present, needed
    repository = exported("tiny-a")
    args = [str(server_site), str(ROOT / "server"), str(repository), str(ROOT / "export")]
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _SERVER_CHILD, json.dumps(args)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["prompt_tokens"] > 0, report
