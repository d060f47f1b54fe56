"""Shared fixtures: conformance vectors shipped in tests/data, tiny checkpoints built offline."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).parent / "data"
CONFORMANCE = DATA / "conformance"
CHECKPOINTS = ("tiny-a", "tiny-b")


def _conformance(section: str) -> list[tuple[str, int, dict]]:
    out = []
    for name in CHECKPOINTS:
        items = json.loads((CONFORMANCE / f"{name}.cases.json").read_text())[section]
        out += [(name, i, item) for i, item in enumerate(items)]
    return out


def conformance_cases() -> list[tuple[str, int, dict]]:
    return _conformance("cases")


def conformance_prompts() -> list[tuple[str, int, dict]]:
    return _conformance("prompts")


def case_id(item: tuple[str, int, dict]) -> str:
    name, i, case = item
    req = case.get("request", case)
    n = len(req["passages"]) if "passages" in req else req.get("n")
    return f"{name}-{i}-n{n}"


@pytest.fixture(scope="session")
def dl19() -> list[dict]:
    with gzip.open(DATA / "bm25_dl19.json.gz", "rt") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pe_rank.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny", seed=7)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from pe_rank.runtime.inprocess import load_in_process

    return load_in_process(tiny_dir)


@pytest.fixture(scope="session")
def conformance_models():
    from pe_rank.runtime.inprocess import load_in_process

    return {name: load_in_process(CONFORMANCE / name) for name in CHECKPOINTS}


# ---- real Triton servers on exported tiny repositories (shared by the Triton and server tests)

@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, target) -> repository path; conformance checkpoints or 'tiny'."""
    from pe_rank_export.repository import ExportOptions, export_repository

    made: dict[tuple[str, str], Path] = {}

    def get(name: str, target: str = "torch") -> Path:
        if (name, target) not in made:
            repo = tmp_path_factory.mktemp(f"repo-{name}-{target}")
            export_repository(CONFORMANCE / name, repo,
                              ExportOptions(target=target, gpu=False),
                              log=lambda *_: None)
            made[(name, target)] = repo
        return made[(name, target)]

    return get


@pytest.fixture(scope="session")
def tritons(exported):
    """tritons(name, target) -> a running TritonServer for that exported repository (started once)."""
    from pe_rank.service.embedded_triton import TritonServer

    running: dict[tuple[str, str], TritonServer] = {}

    def get(name: str, target: str = "torch") -> TritonServer:
        key = (name, target)
        if key not in running or not running[key].is_alive():
            running[key] = TritonServer(exported(name, target)).start()
        return running[key]

    yield get
    for server in running.values():
        server.stop()


# ---- helpers shared by the engine, Triton and server tests


def decode_alone(stepper, job) -> tuple[list[int], int]:
    """A window decoded in this process with plain start/step calls, no engine: (order, decode steps)."""
    from pe_rank.core.ranker import WindowDecoder

    decoder = WindowDecoder(len(job.embeds), job.mode, job.emit)
    state, scores = stepper.start(job.prompt_ids, job.embeds)
    while (pick := decoder.feed(scores)) is not None:
        scores = stepper.step(state, pick)
    return decoder.order, decoder.decode_steps


def metrics_page(process) -> str:
    """A Triton's or a pe-rank server's whole /metrics page (Prometheus text)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics") as page:
        return page.read().decode()


def metric_of(process, series: str) -> float:
    """One series of a Triton's or a pe-rank server's /metrics (0 when absent), e.g. 'pe_llm_live_windows{model="pe_llm"}'."""
    for line in metrics_page(process).splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
