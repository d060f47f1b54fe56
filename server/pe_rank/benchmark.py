"""``pe-rank bench``: latency and throughput, as ratios of medians measured side by side.

Every variant runs on the same queries, interleaved query by query (not variant after
variant), after a warm-up, so machine noise hits all of them alike. Absolute times are
reported only with the machine they came from.
"""
from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .core.types import Mode, Passage, RankOptions, RerankRequest

IN_PROCESS = {"pe_rank_full": {}, "pe_rank_first": {"mode": Mode.FIRST}, "pe_rank_top10": {"top_n": 10}}


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "n": len(values)}


def _requests(data: Path, queries: int, top_k: int) -> list[RerankRequest]:
    opener = gzip.open if data.suffix == ".gz" else open
    with opener(data, "rt") as f:
        items = json.load(f)[:queries]
    return [RerankRequest(q["query"], tuple(Passage(h["docid"], h["content"]) for h in q["hits"][:top_k]))
            for q in items]


def _machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def _timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = await coro
    return (time.perf_counter() - t0) * 1e3, result


def _record(runs: dict, name: str, ms: float, prompt_tokens: int, steps: int) -> None:
    entry = runs.setdefault(name, {"latency_ms": [], "prompt_tokens": [], "decode_steps": []})
    entry["latency_ms"].append(ms)
    entry["prompt_tokens"].append(prompt_tokens)
    entry["decode_steps"].append(steps)


async def _in_process(model, reranker, requests, runs: dict, text_queries: int) -> None:
    from .core.text_listwise import rank_text_listwise

    for i, request in enumerate(requests):
        for name, change in IN_PROCESS.items():
            ms, result = await _timed(reranker.rerank(RerankRequest(**{**request.__dict__, **change})))
            _record(runs, name, ms, result.stats.prompt_tokens, result.stats.decode_steps)
        if i < text_queries:
            ms, (_, stats) = await _timed(rank_text_listwise(
                model, request.query, [p.text for p in request.passages], RankOptions()))
            _record(runs, "text_listwise", ms, stats.prompt_tokens, stats.decode_steps)


class _Service:
    """An exported repository, an embedded Triton and `pe-rank serve`, torn down on exit."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint

    def __enter__(self) -> str:
        from pe_rank_export.repository import ExportOptions, export_repository

        from .triton.embedded import TritonServer, free_port

        self.tmp = tempfile.TemporaryDirectory(prefix="pe-rank-bench-")
        repo = Path(self.tmp.name) / "repository"
        export_repository(self.checkpoint, repo, ExportOptions(target="torch", gpu=False), log=lambda *_: None)
        self.triton = TritonServer(repo).start()
        port = free_port()
        self.server = subprocess.Popen([sys.executable, "-m", "pe_rank", "serve", "--repository", str(repo),
                                        "--triton-url", self.triton.grpc_url, "--port", str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.target = f"127.0.0.1:{port}"
        _wait_serving(self.target, self.server)
        return self.target

    def __exit__(self, *exc) -> None:
        self.server.terminate()
        self.server.wait(timeout=60)
        self.triton.stop()
        self.tmp.cleanup()


def _wait_serving(target: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("pe-rank serve exited during start-up")
        with grpc.insecure_channel(target) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.5)
    raise RuntimeError("pe-rank serve did not become SERVING")


async def _through_server(target: str, requests, runs: dict, concurrency: list[int]) -> dict:
    from .client import AsyncRankerClient

    sweep = {}
    async with AsyncRankerClient(target) as client:
        await client.rerank(requests[0])  # warm-up
        for request in requests:
            ms, response = await _timed(client.rerank(request))
            _record(runs, "server_full", ms, response.metadata.prompt_tokens, response.metadata.decode_steps)
        for clients in concurrency:
            jobs = [requests[i % len(requests)] for i in range(max(clients * 2, len(requests)))]
            queue: asyncio.Queue = asyncio.Queue()
            for job in jobs:
                queue.put_nowait(job)
            latencies: list[float] = []

            async def worker() -> None:
                while not queue.empty():
                    ms, _ = await _timed(client.rerank(queue.get_nowait()))
                    latencies.append(ms)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - t0
            sweep[str(clients)] = {"throughput_qps": len(jobs) / wall, **_percentiles(latencies)}
    return sweep


def _median(runs: dict, name: str) -> float | None:
    return statistics.median(runs[name]["latency_ms"]) if name in runs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


async def run_bench(checkpoint: Path, data: Path, queries: int, top_k: int, text_queries: int,
                    concurrency: list[int], with_server: bool = True) -> dict:
    from .core.inprocess import load_in_process

    model, reranker = load_in_process(checkpoint)
    requests = _requests(data, queries, top_k)
    await reranker.rerank(requests[0])  # warm-up
    runs: dict = {}
    await _in_process(model, reranker, requests, runs, text_queries)
    sweep: dict = {}
    if with_server:
        with _Service(checkpoint) as target:
            sweep = await _through_server(target, requests, runs, concurrency)
    full = _median(runs, "pe_rank_full")
    qps = {int(k): v["throughput_qps"] for k, v in sweep.items()}
    top = max(qps) if qps else None
    return {
        "machine": _machine(), "commit": _commit(), "model": str(checkpoint),
        "settings": {"data": str(data), "queries": len(requests), "top_k": top_k, "text_queries": text_queries,
                     "window_size": 20, "stride": 10, "concurrency": concurrency},
        "variants": {name: {"latency_ms": _percentiles(r["latency_ms"]),
                            "prompt_tokens_mean": float(np.mean(r["prompt_tokens"])),
                            "decode_steps_mean": float(np.mean(r["decode_steps"]))} for name, r in runs.items()},
        "concurrency": sweep,
        "text_over_pe_rank": _ratio(_median(runs, "text_listwise"), full),
        "server_over_in_process": _ratio(_median(runs, "server_full"), full),
        "top10_over_full": _ratio(_median(runs, "pe_rank_top10"), full),
        "first_over_full": _ratio(_median(runs, "pe_rank_first"), full),
        f"throughput_{8 if 8 in qps else top}_over_1": _ratio(qps.get(8, qps.get(top)), qps.get(1)),
    }


def report_markdown(result: dict) -> str:
    lines = [f"# pe-rank bench, {result['machine']['cpu']} ({result['machine']['cores']} cores)", "",
             f"model `{result['model']}`, commit `{result['commit'][:12]}`, {result['settings']['queries']} DL19 queries, "
             f"top-{result['settings']['top_k']}", "", "| variant | p50 ms | p95 ms | p99 ms | prompt tokens | decode steps |",
             "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lat = v["latency_ms"]
        lines.append(f"| {name} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} | "
                     f"{v['prompt_tokens_mean']:.0f} | {v['decode_steps_mean']:.0f} |")
    lines += ["", "| clients | queries/s | p50 ms | p95 ms |", "|---|---|---|---|"]
    for clients, v in result["concurrency"].items():
        lines.append(f"| {clients} | {v['throughput_qps']:.2f} | {v['p50']:.0f} | {v['p95']:.0f} |")
    lines += ["", "Ratios of medians measured in this run:", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in result.items() if k.endswith(("_over_1", "_over_full", "_over_pe_rank",
                                                                          "_over_in_process")) and v]
    return "\n".join(lines) + "\n"


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pe-rank bench", description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/demo"))
    parser.add_argument("--data", type=Path, default=Path("tests/data/bm25_dl19.json.gz"))
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--text-queries", type=int, default=5, help="queries for the (slow) text-listwise baseline")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--quick", action="store_true", help="5 queries, top-20, text on 2, concurrency 1,2,8")
    parser.add_argument("--no-server", action="store_true", help="in-process variants only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.top_k, args.text_queries, args.concurrency = 5, 20, 2, "1,2,8"
    concurrency = [int(c) for c in args.concurrency.split(",")]
    result = asyncio.run(run_bench(args.model, args.data, args.queries, args.top_k, args.text_queries,
                                   concurrency, with_server=not args.no_server))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}-{platform.node() or 'host'}-top{args.top_k}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(report_markdown(result))
    print(json.dumps(result) if args.json else report_markdown(result) + f"\nwritten: {stem}.json / .md")
    return 0
