"""``pe-rank bench``: latency and throughput, as ratios of medians measured side by side.

Every variant runs on the same queries, interleaved query by query (not variant after
variant), after a warm-up, so machine noise hits all of them alike. Absolute times are
reported only with the machine they came from. With ``--qrels`` every variant's rankings are
also scored (NDCG@10 with ir-measures, as ``pe-rank eval`` does), and the Markdown report
gets PNG charts next to it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..core.types import Mode
from .results import git_commit, machine_info, machine_line, result_stem
from .evaluation import Query, Ranked, load_qrels, load_rankllm, rerank_order, score, to_request

# the paper's setting (no pre-rank, sliding windows over every candidate) in its three modes, and the
# model's own defaults (its ranking.json: e.g. the encoder pre-rank, then PE-Rank on the top 20)
PAPER = {"prerank": False, "depth": 0}
IN_PROCESS = {"pe_rank_full": PAPER, "pe_rank_first": {**PAPER, "mode": Mode.FIRST},
              "pe_rank_top10": {**PAPER, "top_n": 10}, "pe_rank_default": {}}
TEXT = {"mode": Mode.TEXT}  # the text-listwise baseline, the same LLM reading passage texts
MODE_LABELS = {"pe_rank_full": "full", "pe_rank_first": "first", "pe_rank_top10": "top10",
               "pe_rank_default": "model defaults", "text_listwise": "text"}
QUALITY = "nDCG@10"  # the measure the report and its chart show (evaluation.REPORTED names)


def _percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "n": len(values)}


def _queries(data: Path, queries: int) -> list[Query]:
    return [q for q in load_rankllm(data) if q.hits][:queries]


async def _timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = await coro
    return (time.perf_counter() - t0) * 1e3, result


def _record(runs: dict, name: str, ms: float, prompt_tokens: int, steps: int, query: Query, order: list[int],
            top_k: int) -> None:
    entry = runs.setdefault(name, {"latency_ms": [], "prompt_tokens": [], "decode_steps": [], "rankings": {}})
    entry["latency_ms"].append(ms)
    entry["prompt_tokens"].append(prompt_tokens)
    entry["decode_steps"].append(steps)
    entry["rankings"][query.qid] = rerank_order(query, Ranked(order), top_k)


async def _in_process(ranker, queries: list[Query], top_k: int, runs: dict, text_queries: int) -> None:
    for i, query in enumerate(queries):
        names = [*IN_PROCESS, *(["text_listwise"] if i < text_queries else [])]
        for name in names:
            ms, result = await _timed(ranker.rank(to_request(query, top_k, **IN_PROCESS.get(name, TEXT))))
            _record(runs, name, ms, result.stats.prompt_tokens, result.stats.decode_steps, query,
                    [r.index for r in result.ranking], top_k)


class _Service:
    """An exported repository, an embedded Triton and `pe-rank serve`, torn down on exit."""

    def __init__(self, checkpoint: Path, max_clients: int) -> None:
        self.checkpoint, self.max_clients = checkpoint, max_clients

    def __enter__(self) -> str:
        from pe_rank_export.repository import ExportOptions, export_repository

        from ..service.embedded_triton import TritonServer, free_port

        self.tmp = tempfile.TemporaryDirectory(prefix="pe-rank-bench-")
        repo = Path(self.tmp.name) / "repository"
        export_repository(self.checkpoint, repo, ExportOptions(target="torch", gpu=False), log=lambda *_: None)
        self.triton = TritonServer(repo).start()
        port = free_port()
        self.server = subprocess.Popen([sys.executable, "-m", "pe_rank", "serve", "--repository", str(repo),
                                        "--triton-url", self.triton.grpc_url, "--port", str(port),
                                        # admission wide open: the sweep measures what the machine does
                                        # with N clients, which is how --max-concurrent gets sized
                                        "--max-concurrent", str(self.max_clients), "--max-queued", "0",
                                        "--max-request-time", "0",
                                        # no embedding cache: every request pays its encoding, so a repeated
                                        # burst is not faster for having been seen before
                                        "--cache-size", "0"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.target = f"127.0.0.1:{port}"
        _wait_serving(self.target, self.server)
        return self

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


def triton_counters(metrics_port: int) -> dict[str, float]:
    """pe_llm's calls (Triton's own counter) and its engine's step-batch histogram, from Triton's /metrics."""
    import urllib.request

    wanted = {'nv_inference_request_success{model="pe_llm",version="1"}': "llm_calls",
              'pe_llm_step_batch_size_sum{model="pe_llm"}': "batch_sum",
              'pe_llm_step_batch_size_count{model="pe_llm"}': "batch_count"}
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
        lines = page.read().decode().splitlines()
    values = {name: 0.0 for name in wanted.values()}
    for line in lines:
        key, _, value = line.rpartition(" ")
        if key in wanted:
            values[wanted[key]] = float(value)
    return values


async def _burst(client, requests: list) -> dict[str, float]:
    """All ``requests`` at once, one client each: latency percentiles and the burst's wall time."""
    t0 = time.perf_counter()
    timed = await asyncio.gather(*(_timed(client.rerank(r)) for r in requests))
    return {**_percentiles([ms for ms, _ in timed]), "wall_ms": (time.perf_counter() - t0) * 1e3}


async def _through_server(service: "_Service", queries: list[Query], top_k: int, runs: dict,
                          concurrency: list[int]) -> tuple[dict, float, dict]:
    """The first burst after a fresh start, single-client runs, the concurrency sweep, the same burst again;
    returns (sweep, pe_llm calls per query, the two bursts)."""
    from ..client import AsyncRankerClient

    sweep = {}
    requests = [to_request(q, top_k, **PAPER) for q in queries]  # the sweep keeps the paper's setting

    def counters() -> dict[str, float]:
        return triton_counters(service.triton.metrics_port)

    burst = [requests[i % len(requests)] for i in range(max(concurrency))]
    async with AsyncRankerClient(service.target) as client:
        bursts = {"first": await _burst(client, burst)}  # the server and Triton as they come up: nothing before it
        await client.rerank(requests[0])  # warm-up
        before = counters()
        for query, request in zip(queries, requests):
            ms, response = await _timed(client.rerank(request))
            _record(runs, "server_full", ms, response.metadata.prompt_tokens, response.metadata.decode_steps,
                    query, [r.index for r in response.ranks], top_k)
        await asyncio.sleep(0.5)  # the python backend reports a request's statistics after its response
        llm_calls_per_query = (counters()["llm_calls"] - before["llm_calls"]) / len(requests)
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

            before = counters()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            wall = time.perf_counter() - t0
            after = counters()
            steps = after["batch_count"] - before["batch_count"]
            sweep[str(clients)] = {"throughput_qps": len(jobs) / wall, **_percentiles(latencies),
                                   "mean_step_batch": (after["batch_sum"] - before["batch_sum"]) / steps
                                   if steps else None}
        bursts["later"] = await _burst(client, burst)
    return sweep, llm_calls_per_query, bursts


def _median(runs: dict, name: str) -> float | None:
    return statistics.median(runs[name]["latency_ms"]) if name in runs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _quality(qrels: dict[str, dict[str, int]], rankings: dict[str, list[str]]) -> dict[str, float]:
    """ir-measures over the queries this variant ranked (the text baseline ranks fewer)."""
    means, per_query = score(qrels, rankings)
    return {**means, "judged_queries": len(per_query)}


async def run_bench(checkpoint: Path, data: Path, queries: int, top_k: int, text_queries: int,
                    concurrency: list[int], with_server: bool = True,
                    qrels: dict[str, dict[str, int]] | None = None) -> dict:
    from ..runtime.inprocess import load_ranker

    ranker = load_ranker(checkpoint)
    items = _queries(data, queries)
    await ranker.rank(to_request(items[0], top_k))  # warm-up
    runs: dict = {}
    await _in_process(ranker, items, top_k, runs, text_queries)
    sweep: dict = {}
    bursts: dict = {}
    llm_calls_per_query = None
    if with_server:
        with _Service(checkpoint, max(concurrency)) as service:
            sweep, llm_calls_per_query, bursts = await _through_server(service, items, top_k, runs, concurrency)
    full = _median(runs, "pe_rank_full")
    qps = {int(k): v["throughput_qps"] for k, v in sweep.items()}
    top = max(qps) if qps else None
    variants = {name: {"latency_ms": _percentiles(r["latency_ms"]),
                       "prompt_tokens_mean": float(np.mean(r["prompt_tokens"])),
                       "decode_steps_mean": float(np.mean(r["decode_steps"]))} for name, r in runs.items()}
    quality: dict = {}
    if qrels is not None:
        for name, r in runs.items():
            variants[name]["quality"] = _quality(qrels, r["rankings"])
        quality = {"first_stage": _quality(qrels, {q.qid: [h.docid for h in q.hits[:top_k]] for q in items})}
    return {
        "machine": machine_info(), "commit": git_commit(), "model": str(checkpoint),
        "settings": {"data": str(data), "queries": len(items), "top_k": top_k, "text_queries": text_queries,
                     "window_size": 20, "stride": 10, "concurrency": concurrency},
        "variants": variants,
        **quality,
        "concurrency": sweep,
        "text_over_pe_rank": _ratio(_median(runs, "text_listwise"), full),
        "server_over_in_process": _ratio(_median(runs, "server_full"), full),
        "top10_over_full": _ratio(_median(runs, "pe_rank_top10"), full),
        "first_over_full": _ratio(_median(runs, "pe_rank_first"), full),
        "default_over_full": _ratio(_median(runs, "pe_rank_default"), full),
        "llm_calls_per_query": llm_calls_per_query,
        "bursts": bursts,
        "first_burst_over_later": _ratio(bursts.get("first", {}).get("p50"), bursts.get("later", {}).get("p50")),
        f"throughput_{8 if 8 in qps else top}_over_1": _ratio(qps.get(8, qps.get(top)), qps.get(1)),
    }


def report_markdown(result: dict) -> str:
    judged = "quality" in next(iter(result["variants"].values()), {})
    lines = [f"# pe-rank bench, {machine_line(result['machine'])}", "",
             f"model `{result['model']}`, commit `{result['commit'][:12]}`, {result['settings']['queries']} DL19 queries, "
             f"top-{result['settings']['top_k']}", "",
             "| variant | p50 ms | p95 ms | p99 ms | prompt tokens | decode steps |" + (f" {QUALITY} | queries |" if judged else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if judged else "")]
    for name, v in result["variants"].items():
        lat = v["latency_ms"]
        quality = f" {v['quality'][QUALITY]:.4f} | {v['quality']['judged_queries']} |" if judged else ""
        lines.append(f"| {name} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} | "
                     f"{v['prompt_tokens_mean']:.0f} | {v['decode_steps_mean']:.0f} |{quality}")
    if "first_stage" in result:
        first = result["first_stage"]
        lines += ["", f"First-stage order on the same queries: {QUALITY} {first[QUALITY]:.4f} "
                      f"({first['judged_queries']} judged queries)."]
    lines += ["", "| clients | queries/s | p50 ms | p95 ms | mean step batch |", "|---|---|---|---|---|"]
    for clients, v in result["concurrency"].items():
        batch = v.get("mean_step_batch")
        lines.append(f"| {clients} | {v['throughput_qps']:.2f} | {v['p50']:.0f} | {v['p95']:.0f} | "
                     f"{batch:.2f} |" if batch else f"| {clients} | {v['throughput_qps']:.2f} | {v['p50']:.0f} | "
                     f"{v['p95']:.0f} | - |")
    if result.get("llm_calls_per_query") is not None:
        lines += ["", f"pe_llm calls per query (Triton's counter): {result['llm_calls_per_query']:.1f} "
                      f"({result['settings']['top_k']} passages, 20/10 windows)."]
    bursts = result.get("bursts") or {}
    if bursts:
        lines += ["", f"A burst of {bursts['first']['n']} requests at once, right after the server and Triton came up "
                      f"(p50 {bursts['first']['p50']:.0f} ms, wall {bursts['first']['wall_ms']:.0f} ms), and the same "
                      f"burst at the end (p50 {bursts['later']['p50']:.0f} ms, wall {bursts['later']['wall_ms']:.0f} ms)."]
    lines += ["", "Ratios of medians measured in this run:", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in result.items() if k.endswith(("_over_1", "_over_full", "_over_pe_rank",
                                                                          "_over_in_process", "_over_later")) and v]
    first = result.get("first_over_full")
    if first:  # decode steps free under batching: the most 8 clients can gain over 1
        lines.append(f"- bound for throughput 8/1 when batched decode steps are free: 1 / first_over_full = "
                     f"{1 / first:.2f}")
    titles = {"latency_vs_concurrency": "Latency vs concurrency", "quality_vs_latency": f"{QUALITY} vs latency"}
    for kind, name in result.get("plots", {}).items():
        lines += ["", f"![{titles.get(kind, kind)}]({name})"]
    return "\n".join(lines) + "\n"


def _figure(width: float = 6.4, height: float = 4.2):
    """A pyplot-free figure on the Agg canvas: no display and no global backend state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def write_plots(result: dict, stem: Path) -> dict[str, str]:
    """PNGs next to the report; returns {kind: file name}, the links are relative to the .md."""
    from matplotlib.ticker import NullLocator, ScalarFormatter

    plots: dict[str, str] = {}
    subtitle = f"{Path(result['model']).name}, top-{result['settings']['top_k']}, {result['machine']['cpu']}"
    sweep = result["concurrency"]
    if sweep:
        clients = [int(c) for c in sweep]
        figure = _figure()
        ax = figure.add_subplot()
        for key, style in (("p50", "o-"), ("p95", "s--")):
            ax.plot(clients, [sweep[str(c)][key] / 1e3 for c in clients], style, label=f"latency {key}")
        ax.set_xscale("log", base=2)  # 1, 2, 4, 8, 16 clients evenly spaced
        ax.set(xlabel="concurrent clients (gRPC, log scale)", ylabel="latency per query (s)", xticks=clients,
               ylim=(0, None), title=f"Latency vs concurrency\n{subtitle}")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        qps = ax.twinx()
        throughput = [sweep[str(c)]["throughput_qps"] for c in clients]
        qps.plot(clients, throughput, "^:", color="tab:green", label="throughput (right axis)")
        qps.set(ylabel="queries/s", ylim=(0, 1.15 * max(throughput)))
        ax.grid(alpha=0.3)
        figure.legend(loc="outside lower center", ncols=3)
        plots["latency_vs_concurrency"] = _save(figure, stem, "latency")
    judged = {name: v for name, v in result["variants"].items() if name in MODE_LABELS and "quality" in v}
    if judged:
        figure = _figure()
        ax = figure.add_subplot()
        for name, v in judged.items():  # a legend, not annotations: close points would overlap
            ax.plot([v["latency_ms"]["p50"] / 1e3], [v["quality"][QUALITY]], "o", markersize=9,
                    label=f"{MODE_LABELS[name]} ({v['quality']['judged_queries']} queries)")
        if "first_stage" in result:
            ax.axhline(result["first_stage"][QUALITY], color="grey", linestyle="--", label="first-stage order")
        ax.set_xscale("log")
        ax.set(xlabel="latency per query, p50 (s, log scale)", ylabel=QUALITY,
               title=f"{QUALITY} vs latency by mode (in-process)\n{subtitle}")
        ax.grid(alpha=0.3, which="both")
        ax.margins(x=0.25, y=0.2)
        figure.legend(loc="outside lower center", ncols=3)
        plots["quality_vs_latency"] = _save(figure, stem, "ndcg")
    return plots


def _save(figure, stem: Path, kind: str) -> str:
    path = stem.parent / f"{stem.name}-{kind}.png"
    figure.savefig(path)
    return path.name


def cli_main(argv: list[str]) -> int:
    if any(arg == "--synthetic" or arg.startswith("--synthetic=") for arg in argv):
        # a synthetic model on a bare GPU machine: nothing below (Triton, gRPC, matplotlib) is needed
        from .gpu_bench import cli_main as synthetic_main

        return synthetic_main(argv)
    parser = argparse.ArgumentParser(prog="pe-rank bench", description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/demo"))
    parser.add_argument("--data", type=Path, default=Path("tests/data/bm25_dl19.json.gz"))
    parser.add_argument("--qrels", type=Path, help="TREC qrels: also report each variant's NDCG@10 and plot it")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--text-queries", type=int, default=5, help="queries for the (slow) text-listwise baseline")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--quick", action="store_true", help="5 queries, top-20, text on 2, concurrency 1,2,8")
    parser.add_argument("--no-server", action="store_true", help="in-process variants only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--synthetic", metavar="SHAPE",
                        help="tiny|smollm2-135m|mistral-7b: random-weight model on --device (see `pe-rank bench --synthetic tiny --help`)")
    args = parser.parse_args(argv)
    if args.quick:
        args.queries, args.top_k, args.text_queries, args.concurrency = 5, 20, 2, "1,2,8"
    concurrency = [int(c) for c in args.concurrency.split(",")]
    qrels = load_qrels(args.qrels) if args.qrels else None  # fail before minutes of benchmarking
    result = asyncio.run(run_bench(args.model, args.data, args.queries, args.top_k, args.text_queries,
                                   concurrency, with_server=not args.no_server, qrels=qrels))
    stem = result_stem(args.out, f"top{args.top_k}")
    result["plots"] = write_plots(result, stem)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(report_markdown(result))
    print(json.dumps(result) if args.json else report_markdown(result) + f"\nwritten: {stem}.json / .md")
    return 0
