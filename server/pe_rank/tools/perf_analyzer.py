"""``pe-rank perf-analyzer``: Triton's own load generator against pe_embed, pe_projector, pe_llm and pe_rank.

``pe-rank bench`` times the whole service. This measures the Triton models alone, as
perf_analyzer sees them over gRPC on loopback, with a fixed number of requests per
concurrency level (``--request-count``: bounded, no stability search). The input data are
real. pe_embed gets DL19 BM25 windows as TEXT. pe_projector gets their encoder embeddings,
and pe_llm their projections, both as the Triton under test returns them from pe_embed.
pe_llm's PROMPT_IDS come from the repository's own prompt tokenizer; one request is one
full-mode window, as the server sends them. pe_rank gets whole DL19 requests (query and
the top-``--rank-passages`` BM25 texts), ranked inside Triton.

perf-analyzer 2.60 exists only as a manylinux_2_38 wheel. On an older glibc (Debian 12 has
2.36) it runs through the dynamic loader of a newer Debian's libc. ``install`` gets the
wheel with pip, and libc6, libstdc++6 and libgcc-s1 from Debian trixie with apt-get under a
private apt configuration (the system's sources and lists stay untouched). It unpacks both
into a git-ignored cache and writes a ``bin/perf_analyzer`` wrapper there, which also works
by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ..core.errors import UserError

PA_VERSION = "2.60.0"
PA_WHEEL = f"perf_analyzer-{PA_VERSION}-py3-none-manylinux_2_38_x86_64.whl"
PA_WHEEL_SHA256 = "23ef56b107ae9233e5cf09fbdf508dd9b936a52f1bae2f63f53c8117087b3f25"
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
DEBIAN_SUITE = "trixie"  # glibc 2.41, libstdc++ from GCC 14: newer than the wheel needs
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")  # bookworm's holds trixie's keys
RUNTIME_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
LIBDIR = "usr/lib/x86_64-linux-gnu"
DEFAULT_CACHE = Path("bench/perf_analyzer/cache")
MODELS = ("pe_embed", "pe_projector", "pe_llm", "pe_rank")

Log = Callable[[str], None]


class PerfAnalyzerError(RuntimeError):
    """Set-up or a load test failed; the message says which step and why."""


# ---- installation


def system_debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (the first ``URIs:``/``deb`` line naming debian)."""
    for path in APT_SOURCES:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1:
                uri = words[1]
            elif words[:1] == ["deb"] and len(words) > 2:
                uri = next((w for w in words[1:] if "://" in w), "")
            else:
                continue
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise PerfAnalyzerError(f"no Debian archive found in {', '.join(map(str, APT_SOURCES))}: pass --debian-mirror URI")


def install(cache: Path = DEFAULT_CACHE, mirror: str | None = None, log: Log = print) -> Path:
    """The cached ``bin/perf_analyzer`` wrapper, fetching only what is missing (idempotent)."""
    if platform.machine() != "x86_64":
        raise PerfAnalyzerError(f"perf-analyzer {PA_VERSION} is published for x86_64 only, not {platform.machine()}")
    cache = cache.resolve()
    wrapper = cache / "bin" / "perf_analyzer"
    if wrapper.exists() and _runs(wrapper):
        return wrapper
    binary = _fetch_binary(cache, log)
    native = _runs(binary)  # glibc >= 2.38 (e.g. Ubuntu 24.04): no loader needed
    if not native:
        _fetch_runtime(cache, mirror or system_debian_mirror(), log)
    _write_wrapper(wrapper, cache, native)
    if not _runs(wrapper):
        raise PerfAnalyzerError(f"{wrapper} does not start: {_version_output(wrapper)}")
    log(f"perf_analyzer {PA_VERSION} ready: {wrapper}" + ("" if native else f" (through Debian {DEBIAN_SUITE}'s loader)"))
    return wrapper


def _version_output(program: Path) -> str:
    try:
        done = subprocess.run([str(program), "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        return str(exc)
    return (done.stdout + done.stderr).strip()


def _runs(program: Path) -> bool:
    return "Perf Analyzer Version" in _version_output(program)


def _check(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise PerfAnalyzerError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")


def _fetch_binary(cache: Path, log: Log) -> Path:
    """The wheel from PyPI (pip, pinned by hash), of which only the binary is used."""
    binary = cache / "perf_analyzer" / "bin" / "perf_analyzer"
    if binary.exists():
        return binary
    wheel = cache / "wheels" / PA_WHEEL
    if not wheel.exists():
        log(f"downloading {PA_WHEEL} with pip")
        _check([sys.executable, "-m", "pip", "download", f"perf-analyzer=={PA_VERSION}", "--no-deps",
                "--platform", "manylinux_2_38_x86_64", "--only-binary=:all:", "--dest", str(wheel.parent)],
               "pip download perf-analyzer")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != PA_WHEEL_SHA256:
        wheel.unlink()
        raise PerfAnalyzerError(f"{PA_WHEEL}: sha256 {digest}, expected {PA_WHEEL_SHA256}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(binary.name + ".tmp")
    with zipfile.ZipFile(wheel) as archive:
        tmp.write_bytes(archive.read("perf_analyzer/bin/perf_analyzer"))
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.rename(binary)
    return binary


def _apt_options(apt: Path) -> list[str]:
    """apt-get options that confine sources, lists, caches and status to ``apt``."""
    options = [f"Dir::Etc::sourcelist={apt / 'sources.list'}", f"Dir::Etc::sourceparts={apt / 'sources.list.d'}",
               f"Dir::Etc::preferences={apt / 'preferences'}", f"Dir::Etc::preferencesparts={apt / 'preferences.d'}",
               f"Dir::State::Lists={apt / 'lists'}", f"Dir::State::status={apt / 'status'}",
               f"Dir::Cache={apt / 'cache'}", "Dir::Cache::pkgcache=", "Dir::Cache::srcpkgcache=",
               "APT::Architecture=amd64", "APT::Architectures=amd64", "Acquire::Languages=none"]
    if os.geteuid() == 0:
        options.append("APT::Sandbox::User=root")  # apt's _apt user may not write into the cache
    return [arg for option in options for arg in ("-o", option)]


def _fetch_runtime(cache: Path, mirror: str, log: Log) -> Path:
    """libc6, libstdc++6, libgcc-s1 of Debian trixie, unpacked (not installed) under ``cache/runtime``."""
    root = cache / "runtime"
    if (root / LIBDIR / "ld-linux-x86-64.so.2").exists():
        return root
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise PerfAnalyzerError(f"this glibc is older than 2.38 and {', '.join(missing)} is missing: "
                                "pass --perf-analyzer with a perf_analyzer that runs here")
    if not DEBIAN_KEYRING.exists():
        raise PerfAnalyzerError(f"{DEBIAN_KEYRING} is missing (apt-get install debian-archive-keyring)")
    apt = cache / "apt"
    for folder in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d", "debs"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(f"deb [signed-by={DEBIAN_KEYRING}] {mirror} {DEBIAN_SUITE} main\n")
    (apt / "status").touch()
    options = _apt_options(apt)
    log(f"apt-get update ({DEBIAN_SUITE}, private lists in {apt})")
    _check(["apt-get", *options, "-q", "update"], f"apt-get update for Debian {DEBIAN_SUITE}")
    debs = apt / "debs"
    for old in debs.glob("*.deb"):
        old.unlink()
    log(f"apt-get download {' '.join(RUNTIME_PACKAGES)}")
    _check(["apt-get", *options, "-q", "download", *RUNTIME_PACKAGES], "apt-get download", cwd=debs)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix="runtime-"))
    for deb in sorted(debs.glob("*.deb")):
        _check(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def _write_wrapper(wrapper: Path, cache: Path, native: bool) -> None:
    """A relocatable shell wrapper: paths relative to the cache it lives in."""
    binary = '"$cache/perf_analyzer/bin/perf_analyzer"'
    if native:
        run = f"exec {binary} \"$@\""
    else:
        run = (f'exec "$cache/runtime/{LIBDIR}/ld-linux-x86-64.so.2" --argv0 perf_analyzer '
               f'--library-path "$cache/runtime/{LIBDIR}" {binary} "$@"')
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text("#!/bin/sh\n"
                       f"# Written by `pe-rank perf-analyzer`: perf-analyzer {PA_VERSION} from PyPI"
                       + ("" if native else f", run by Debian {DEBIAN_SUITE}'s dynamic loader (host glibc < 2.38)")
                       + '.\ncache=$(cd "$(dirname "$0")/.." && pwd)\n' + run + "\n")
    wrapper.chmod(0o755)


# ---- input data


@dataclass(frozen=True)
class Inputs:
    files: dict[str, Path]  # model -> perf_analyzer --input-data JSON
    window: int  # passages per pe_embed request, pe_projector batch, pe_llm window
    prompt_tokens: int  # of the first query's window prompt


def _tensor(array: np.ndarray) -> dict:
    return {"content": array.reshape(-1).tolist(), "shape": list(array.shape)}


async def _embed_windows(url: str, windows: list[list[str]], warm_prompt: np.ndarray | None
                         ) -> list[tuple[np.ndarray, np.ndarray]]:
    """pe_embed on every window (real model outputs), then one first-mode window on pe_llm to warm it up."""
    from tritonclient.grpc.aio import InferenceServerClient

    from ..core.ranker import WindowJob
    from ..core.types import Mode
    from ..service.triton_client import TritonWindowBackend, embed_texts

    client = InferenceServerClient(url)
    try:
        outputs = [await embed_texts(client, texts) for texts in windows]
        if warm_prompt is not None:
            await TritonWindowBackend(client).rank_window(WindowJob(warm_prompt, outputs[0][0], Mode.FIRST))
        return outputs
    finally:
        await client.close()


def write_inputs(repository: Path, url: str, data: Path, queries: int, window: int, out: Path,
                 with_llm: bool = True, rank_passages: int = 100) -> Inputs:
    """perf_analyzer input files for the four models, checked against the repository's sizes."""
    from .evaluation import load_rankllm
    from ..service.app import RepositoryView

    view = RepositoryView(repository)
    items = [q for q in load_rankllm(data) if len(q.hits) >= window][:queries]
    if not items or window < 3:
        raise PerfAnalyzerError(f"{data}: need queries with at least --window {window} (>= 3) hits")
    if view.max_batch and window > view.max_batch:
        raise PerfAnalyzerError(f"--window {window} exceeds the repository's max batch size {view.max_batch}")
    windows = [[h.content for h in q.hits[:window]] for q in items]
    prompts = [view.prompts.build(q.text, window)[0] for q in items]
    embedded = asyncio.run(_embed_windows(url, windows, prompts[0] if with_llm else None))
    for projected, encoded in embedded:
        if encoded.shape != (window, view.info.embedding_size) or projected.shape != (window, view.info.hidden_size):
            raise PerfAnalyzerError(f"pe_embed returned {list(encoded.shape)} and {list(projected.shape)}, the "
                                    f"repository says [n, {view.info.embedding_size}] and [n, {view.info.hidden_size}]")
    streams = {
        "pe_embed": [{"TEXT": {"content": texts, "shape": [len(texts)]}} for texts in windows],
        # one entry per passage: the model batches (max_batch_size > 0) and -b stacks `window` of them
        "pe_projector": [{"ENCODER_EMBEDDING": _tensor(row)} for _, encoded in embedded for row in encoded],
        # one request per window, decoded whole (full mode) by pe_llm's engine
        "pe_llm": [{"PROMPT_IDS": _tensor(ids), "PASSAGE_EMBEDS": _tensor(projected)}
                   for ids, (projected, _) in zip(prompts, embedded)],
        # one request per query: its top BM25 texts, ranked inside Triton with the default 20/10 windows
        "pe_rank": [{"QUERY": {"content": [q.text], "shape": [1]},
                     "PASSAGES": {"content": [h.content for h in q.hits[:rank_passages]],
                                  "shape": [len(q.hits[:rank_passages])]}} for q in items],
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for model, stream in streams.items():
        files[model] = out / f"{model}.json"
        files[model].write_text(json.dumps({"data": stream}))
    return Inputs(files, window, len(prompts[0]))


# ---- load tests


@dataclass(frozen=True)
class Load:
    model: str
    batch: int  # items per request (-b); 1 for models without a batch dimension
    requests_per_client: int  # at every concurrency level


def _steps(url: str, model: str) -> list[str]:
    """The models that do the work: an ensemble's steps, else the model itself."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(model, as_json=True)["config"]
    finally:
        client.close()
    return [step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])] or [model]


def _stats(url: str, models: list[str]) -> dict[str, dict[str, int]]:
    """Triton's cumulative counters per model (int64 fields arrive as JSON strings)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    out = {}
    try:
        for model in models:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
            inference = stats["inference_stats"]
            ns = {key: int(inference.get(key, {}).get("ns", 0))
                  for key in ("queue", "compute_input", "compute_infer", "compute_output")}
            out[model] = {"requests": int(inference.get("success", {}).get("count", 0)),
                          "executions": int(stats.get("execution_count", 0)), "queue_ns": ns["queue"],
                          "compute_ns": ns["compute_input"] + ns["compute_infer"] + ns["compute_output"]}
    finally:
        client.close()
    return out


def _server(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict:
    """Server time per request from Triton's counters, summed over an ensemble's steps.

    perf_analyzer's CSV books an ensemble's queueing under network time, hence Triton's own numbers.
    """
    queue = compute = 0.0
    per_execution: dict[str, float | None] = {}
    for model in after:
        delta = {key: after[model][key] - before[model][key] for key in after[model]}
        n = delta["requests"] or 1
        queue += delta["queue_ns"] / n / 1e6
        compute += delta["compute_ns"] / n / 1e6
        per_execution[model] = delta["requests"] / delta["executions"] if delta["executions"] else None
    return {"server_queue_ms": queue, "server_compute_ms": compute, "requests_per_execution": per_execution}


def _percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) / 1e6 if values else None


def _level(row: dict[str, str], load: Load) -> dict:
    """One perf_analyzer CSV row in ms and requests/s; latencies are per request, client side."""
    per_s = float(row["Inferences/Second"]) / load.batch
    level = {"requests_per_s": per_s, "items_per_s": float(row["Inferences/Second"]),
             **{f"{p}_ms": float(row[f"{p} latency"]) / 1e3 for p in ("p50", "p90", "p95", "p99")}}
    return level


def run_load(program: Path, url: str, load: Load, input_file: Path, concurrency: list[int], work: Path,
             timeout_s: float) -> tuple[dict[str, dict], str]:
    """One perf_analyzer run per concurrency level; returns (levels, perf_analyzer's CSV)."""
    levels: dict[str, dict] = {}
    header, rows = "", []
    steps = _steps(url, load.model)
    for clients in concurrency:
        count = load.requests_per_client * clients
        report = work / f"{load.model}-{clients}.csv"
        cmd = [str(program), "-i", "grpc", "-u", url, "-m", load.model, "--input-data", str(input_file),
               "--concurrency-range", str(clients), "--request-count", str(count), "-f", str(report),
               "-b", str(load.batch), "--warmup-request-count", str(clients)]
        before = _stats(url, steps)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(f"{load.model} at concurrency {clients}: no result within {timeout_s:.0f} s "
                                    "(lower --rounds or raise --timeout)") from None
        if done.returncode != 0 or not report.exists():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise PerfAnalyzerError(f"{load.model} at concurrency {clients}: perf_analyzer exited "
                                    f"{done.returncode}: {' '.join(cmd)}\n{tail}")
        lines = report.read_text().splitlines()
        header, rows = lines[0], rows + lines[1:]
        row = next(csv.DictReader(lines))
        levels[str(clients)] = {"requests": count, **_level(row, load), **_server(before, _stats(url, steps))}
    return levels, "\n".join([header, *rows]) + "\n"


def loads(window: int, rounds: int) -> dict[str, Load]:
    """Requests per client at each level: enough for percentiles, few enough for a 2-core CPU."""
    return {"pe_embed": Load("pe_embed", 1, 4 * rounds),
            "pe_projector": Load("pe_projector", window, 50 * rounds),
            "pe_llm": Load("pe_llm", 1, 2 * rounds),
            "pe_rank": Load("pe_rank", 1, rounds)}


# ---- report


DESCRIPTIONS = {
    "pe_embed": ("one request = one window of {window} DL19 passage texts. Server times and requests/execution "
                 "come from the ensemble's steps (tokenizer / encoder / projector)"),
    "pe_projector": "one request = {window} encoder embeddings (`-b {window}`); dynamic batching may merge requests",
    "pe_llm": ("one request = one full-mode window: prefill of {prompt_tokens} prompt tokens with {window} passage "
               "embeddings, then {steps} decode steps, batched with every other live window by pe_llm's engine"),
    "pe_rank": ("one request = one whole DL19 query: its top-{rank_passages} BM25 texts ranked inside Triton "
                "(20/10 windows, each one pe_embed and one pe_llm call through BLS). Server times are pe_rank's own "
                "and so include waiting for its BLS calls"),
}


def report_markdown(result: dict) -> str:
    from .benchmark import machine_line

    s = result["settings"]
    lines = [f"# perf_analyzer, {machine_line(result['machine'])}", "",
             f"perf-analyzer {result['perf_analyzer']} against Triton {result['triton']} (embedded, gRPC on "
             f"loopback), repository `{result['repository']}`, commit `{result['commit'][:12]}`. Inputs: DL19 BM25 "
             f"top-{s['window']} of {s['queries']} queries. Every level sends a fixed number of requests "
             "(`--request-count`). Latencies and requests/s are perf_analyzer's (client side); server queue and "
             "compute are Triton's statistics, mean per request; requests/execution > 1 means Triton batched "
             "requests together.", ""]
    for model, entry in result["models"].items():
        lines += [f"## {model}", "", DESCRIPTIONS[model].format(
            window=s["window"], prompt_tokens=s["prompt_tokens"], steps=s["window"] - 2,
            rank_passages=s.get("rank_passages", 100)) + ".", ""]
        head = ["clients", "requests", "requests/s", "p50 ms", "p95 ms", "p99 ms", "server queue ms",
                "server compute ms", "requests/execution"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for clients, v in entry["levels"].items():
            cells = [clients, str(v["requests"]), f"{v['requests_per_s']:.2f}", *(f"{v[k]:.0f}" for k in (
                "p50_ms", "p95_ms", "p99_ms", "server_queue_ms", "server_compute_ms")),
                " / ".join(f"{r:.2f}" if r else "-" for r in v["requests_per_execution"].values())]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"perf_analyzer's CSV: `{entry['csv']}`", ""]
    return "\n".join(lines)


# ---- command line


def _triton_version(url: str) -> str:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return client.get_server_metadata().version
    finally:
        client.close()


def run(args: argparse.Namespace, program: Path, url: str) -> dict:
    """Inputs from the Triton at ``url``, then every model's load test; the result as JSON."""
    from .benchmark import git_commit, machine_info, result_stem

    models = [m.strip() for m in args.models.split(",")]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise PerfAnalyzerError(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    try:
        concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        concurrency = []
    if not concurrency or min(concurrency) < 1 or args.rounds < 1 or args.queries < 1:
        raise PerfAnalyzerError("--concurrency must list positive integers; --rounds and --queries must be >= 1")
    inputs = write_inputs(args.repository, url, args.data, args.queries, args.window, args.cache / "inputs",
                          with_llm="pe_llm" in models, rank_passages=args.rank_passages)
    stem = result_stem(args.out, "perf_analyzer")
    result: dict = {"settings": {"queries": args.queries, "window": args.window, "concurrency": concurrency,
                                 "rounds": args.rounds, "prompt_tokens": inputs.prompt_tokens,
                                 "rank_passages": args.rank_passages,
                                 "data": str(args.data)},
                    "perf_analyzer": PA_VERSION, "triton": _triton_version(url), "repository": str(args.repository),
                    "models": {}}
    with tempfile.TemporaryDirectory(prefix="pe-rank-pa-") as work:
        for model in models:
            load = loads(args.window, args.rounds)[model]
            print(f"perf_analyzer: {model}, concurrency {args.concurrency}", file=sys.stderr, flush=True)
            levels, table = run_load(program, url, load, inputs.files[model], concurrency, Path(work), args.timeout)
            csv_path = stem.parent / f"{stem.name}-{model}.csv"
            csv_path.write_text(table)
            result["models"][model] = {"batch": load.batch, "csv": csv_path.name, "levels": levels}
    result.update(machine=machine_info(), commit=git_commit())
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(report_markdown(result))
    result["written"] = str(stem)
    return result


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pe-rank perf-analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"),
                        help="an exported repository (`pe-rank export`); an embedded Triton serves it")
    parser.add_argument("--triton-url", help="HOST:PORT of a running Triton serving --repository, instead")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=1, help="scales the requests per client (pe_embed 4, "
                        "pe_projector 50, pe_llm 2 windows, pe_rank 1 query, each times rounds)")
    parser.add_argument("--rank-passages", type=int, default=100, help="passages per pe_rank request")
    parser.add_argument("--queries", type=int, default=5, help="DL19 queries whose windows make the input data")
    parser.add_argument("--window", type=int, default=20, help="passages per window")
    parser.add_argument("--data", type=Path, default=Path("tests/data/bm25_dl19.json.gz"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="git-ignored: perf_analyzer, its "
                        "runtime, the input files")
    parser.add_argument("--perf-analyzer", type=Path, help="use this perf_analyzer instead of installing one")
    parser.add_argument("--debian-mirror", help="Debian archive for the newer runtime (default: the one apt uses here)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per perf_analyzer run")
    parser.add_argument("--install-only", action="store_true", help="install into --cache, print the path, exit")
    args = parser.parse_args(argv)
    from ..service.embedded_triton import TritonServer, TritonStartError

    try:
        program = args.perf_analyzer or install(args.cache, args.debian_mirror,
                                                log=lambda line: print(line, file=sys.stderr, flush=True))
        if args.install_only:
            print(program)
            return 0
        if not (args.repository / "pe_llm" / "1" / "checkpoint").is_dir():
            raise PerfAnalyzerError(f"{args.repository}: not an exported repository (run `pe-rank export "
                                    f"--model models/demo --repository {args.repository}`)")
        if args.triton_url:
            result = run(args, program, args.triton_url)
        else:
            with TritonServer(args.repository) as triton:
                result = run(args, program, triton.grpc_url)
    except (PerfAnalyzerError, TritonStartError) as exc:
        raise UserError(str(exc)) from None
    print(report_markdown(result) + f"\nwritten: {result['written']}.json / .md / -MODEL.csv")
    return 0
