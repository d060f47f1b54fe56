"""``pe-rank soak``: a bounded mixed load on loopback against a real ``pe-rank serve``, with its
embedded Triton SIGKILLed once in the middle; every call is accounted for.

It starts the server itself (``--port 0``, embedded Triton), records a single-client reference
ranking for every distinct valid request, then sends valid, invalid, client-cancelled and
deadline-bound requests from many clients. Each answer is checked against what its kind allows
(valid: OK with the reference ranking, or RESOURCE_EXHAUSTED / UNAVAILABLE; invalid:
INVALID_ARGUMENT naming the right field; ...). After the load the server is stopped with SIGTERM
and every process it ever had below it, and every shared-memory region its Tritons made, must be
gone. Linux only: processes, RSS and shm are read from /proc and /dev/shm (no psutil).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..client import AsyncRankerClient
from .soak_mix import (ALLOWED_REFUSALS, KINDS, LOST, Outcome, SoakError, Spec, describe, field_of, invalid_requests,
                       load_samples, make_plan, parse_mix, ranking_of, valid_pool, verdict)
from .soak_procs import ServerProcess, Watcher, machine, rss_mb

HEALTH_SERVICE = "pe_rank.v1.Ranker"


# ---- health, reference and the load (grpc.aio, one event loop, one channel per client)

class Health:
    """Polls grpc.health.v1 every ``period`` s; after :meth:`arm` (the kill) it records NOT_SERVING and
    the first SERVING that follows it."""

    def __init__(self, target: str, period: float = 0.2) -> None:
        self.target, self.period = target, period
        self.armed_at: float | None = None
        self.down_at: float | None = None
        self.up_at: float | None = None
        self.recovered = asyncio.Event()
        self.statuses: collections.Counter = collections.Counter()
        self.transitions: list[tuple[float, str]] = []  # (time.monotonic(), new status)

    def arm(self) -> None:
        self.armed_at = time.monotonic()

    async def status(self, stub) -> str:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=1.0)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as exc:
            return f"RPC_{exc.code().name}"

    async def wait_serving(self, timeout: float) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + timeout
            while await self.status(stub) != "SERVING":
                if time.monotonic() > deadline:
                    raise SoakError(f"health never became SERVING within {timeout:.0f} s")
                await asyncio.sleep(self.period)

    async def watch(self, halt: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not halt.is_set():
                status = await self.status(stub)
                self.statuses[status] += 1
                now = time.monotonic()
                if not self.transitions or self.transitions[-1][1] != status:
                    self.transitions.append((now, status))
                if self.armed_at is not None:
                    if status != "SERVING" and self.down_at is None:
                        self.down_at = now
                    elif status == "SERVING" and self.down_at is not None and self.up_at is None:
                        self.up_at = now
                        self.recovered.set()
                try:
                    await asyncio.wait_for(halt.wait(), self.period)
                except asyncio.TimeoutError:
                    pass


async def call(stub, msg, *, deadline: float | None, cancel_after: float | None, hard_limit: float):
    """One Rerank: (code, response, details). The client cancels it after ``cancel_after`` s; a call not
    finished within ``hard_limit`` s is cancelled and returned as LOST."""
    rpc = stub.Rerank(msg, timeout=deadline)

    async def finish():
        try:
            return "OK", await rpc, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, None, exc.details() or ""
        except asyncio.CancelledError:
            if rpc.cancelled():  # our own cancel(): the client sees CANCELLED
                return "CANCELLED", None, "cancelled by the client"
            raise

    task = asyncio.ensure_future(finish())
    started = time.monotonic()
    if cancel_after is not None:
        await asyncio.wait({task}, timeout=cancel_after)
        if not task.done():
            rpc.cancel()
    await asyncio.wait({task}, timeout=max(0.0, hard_limit - (time.monotonic() - started)))
    if not task.done():
        rpc.cancel()
        task.cancel()
        return LOST, None, f"no answer within {hard_limit:.0f} s"
    return task.result()


@dataclass
class LoadConfig:
    clients: int
    hard_limit: float
    kill_at: float            # fraction of the plan sent before Triton is killed (<= 0: no kill)
    resume_at: float          # from this fraction on, clients wait for SERVING again before sending
    ready_timeout: float
    seed: int
    backoff_cap: float = 4.0  # a refused client waits 0.25 s, doubling per refusal in a row, up to this
    outage_rate: float = 1.0  # calls per second (all clients together) between the kill and SERVING again


@dataclass
class LoadResult:
    outcomes: list[Outcome | None]
    started: float
    killed_pid: int | None = None
    killed_at: float | None = None
    kill_error: str = ""


async def run_load(target: str, plan: list[Spec], messages: Callable[[Spec], object], timescale: float,
                   config: LoadConfig, health: Health, watcher: Watcher) -> LoadResult:
    """``config.clients`` workers take the next planned call until the plan is done; one of them kills
    Triton when the plan reaches ``kill_at``."""
    result = LoadResult(outcomes=[None] * len(plan), started=time.monotonic())
    kill_index = int(len(plan) * config.kill_at) if config.kill_at > 0 else None
    resume_index = max(int(len(plan) * config.resume_at), (kill_index or 0) + 1)
    cursor = iter(range(len(plan)))
    next_slot = 0.0

    async def outage_pace() -> None:
        """While Triton is down, release calls at ``outage_rate``, so the plan keeps sending through the
        whole restart instead of spending its middle in the first second of it."""
        nonlocal next_slot
        while result.killed_at is not None and not health.recovered.is_set():
            now = time.monotonic()
            if now >= next_slot:
                next_slot = now + 1.0 / config.outage_rate
                return
            try:
                await asyncio.wait_for(health.recovered.wait(), next_slot - now)
            except asyncio.TimeoutError:
                pass

    def kill() -> None:
        pid = watcher.current_triton()
        if pid is None:
            result.kill_error = "no running tritonserver child of the server to kill"
            return
        health.arm()
        os.kill(pid, signal.SIGKILL)
        result.killed_pid, result.killed_at = pid, time.monotonic()

    async def worker(wid: int) -> None:
        rng = random.Random(config.seed * 1000 + wid)
        refusals = 0
        async with AsyncRankerClient(target) as client:
            for i in cursor:
                spec = plan[i]
                if i == kill_index:
                    kill()
                if kill_index is not None and i >= resume_index and result.killed_at is not None:
                    try:
                        await asyncio.wait_for(health.recovered.wait(), config.ready_timeout)
                    except asyncio.TimeoutError:
                        pass  # reported as triton_restarted false; keep sending
                await outage_pace()
                msg = messages(spec)
                deadline = max(0.01, spec.frac * timescale) if spec.kind == "deadline" else None
                cancel_after = max(0.0, spec.frac * timescale) if spec.kind == "cancelled" else None
                limit = deadline + 30.0 if deadline is not None else config.hard_limit
                sent = time.monotonic()
                code, response, details = await call(client.stub, msg, deadline=deadline,
                                                     cancel_after=cancel_after, hard_limit=limit)
                outcome = Outcome(i, spec.kind, code, round(sent - result.started, 3),
                                  round(time.monotonic() - sent, 3), details=details[:300])
                if response is not None:
                    outcome.ranking, outcome.request_id = ranking_of(response), response.metadata.request_id
                result.outcomes[i] = outcome
                if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):  # a polite client backs off, with jitter
                    refusals += 1
                    pause = min(config.backoff_cap, 0.25 * 2 ** (refusals - 1)) * rng.uniform(0.5, 1.0)
                    if result.killed_at is None or health.recovered.is_set():
                        await asyncio.sleep(pause)
                    else:
                        try:  # ... but not past Triton's return
                            await asyncio.wait_for(health.recovered.wait(), pause)
                        except asyncio.TimeoutError:
                            pass
                else:
                    refusals = 0

    await asyncio.gather(*(worker(w) for w in range(config.clients)))
    return result


async def record_references(target: str, pool: list, hard_limit: float) -> tuple[list[tuple], list[float]]:
    """Each distinct valid request once, one client, one at a time: the rankings the load must reproduce."""
    refs, latencies = [], []
    async with AsyncRankerClient(target) as client:
        for i, msg in enumerate(pool):
            t0 = time.monotonic()
            code, response, details = await call(client.stub, msg, deadline=None, cancel_after=None,
                                                 hard_limit=hard_limit)
            if code != "OK":
                raise SoakError(f"reference request {i} ({len(msg.passages)} passages) got {code}: {details}")
            latencies.append(time.monotonic() - t0)
            refs.append(ranking_of(response))
    return refs, latencies


async def final_check(target: str, msg, reference: tuple, hard_limit: float, within: float = 30.0) -> dict:
    """After the load (and Triton's return): one valid request must get OK with its reference ranking.
    Refusals the kind allows are retried for ``within`` s; they are not the answer the service owes."""
    deadline, attempts = time.monotonic() + within, 0
    async with AsyncRankerClient(target) as client:
        while True:
            attempts += 1
            code, response, details = await call(client.stub, msg, deadline=None, cancel_after=None,
                                                 hard_limit=hard_limit)
            if code not in ALLOWED_REFUSALS["valid"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    correct = code == "OK" and ranking_of(response) == reference
    return {"code": code, "correct": correct, "attempts": attempts, "details": details[:300]}


async def model_info(target: str):
    async with AsyncRankerClient(target) as client:
        return await client.model_info(timeout=30)


# ---- figures

def summarise(plan: list[Spec], load: LoadResult, refs: list[tuple], fields: list[str]) -> dict:
    """The soak's figures from the plan and what each call got."""
    by_verdict: collections.Counter = collections.Counter()
    refused, wrong_code = collections.Counter(), collections.Counter()
    by_kind: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    ok = answered = 0
    wrong_examples, wrong_by_variant, ok_by_variant = [], collections.Counter(), collections.Counter()
    for spec, out in zip(plan, load.outcomes):
        if out is None:
            out = Outcome(spec.index, spec.kind, LOST, 0.0, 0.0, details="never sent")
        by_kind[spec.kind][out.code] += 1
        ref = None if spec.kind == "invalid" else refs[spec.variant]
        v = verdict(spec.kind, out, ref, fields[spec.variant] if spec.kind == "invalid" else None)
        by_verdict[v] += 1
        answered += out.code != LOST
        if out.code == "OK" and spec.kind != "invalid":
            ok += 1
            ok_by_variant[spec.variant] += 1
        if v == "refused":
            refused[out.code] += 1
        elif v == "wrong_ranking":
            wrong_by_variant[spec.variant] += 1
        elif v in ("wrong_code", "wrong_field"):
            wrong_code[out.code if v == "wrong_code" else f"{out.code} (field {field_of(out.details)!r})"] += 1
        if v not in ("correct", "refused") and len(wrong_examples) < 20:
            example = {"verdict": v, "variant": spec.variant, **asdict(out), "ranking": None}
            if v == "wrong_ranking":
                got, want = [r[0] for r in out.ranking], [r[0] for r in ref]
                first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                example.update(first_difference=first, got=got, reference=want)
            wrong_examples.append(example)
    ids = [o.request_id for o in load.outcomes if o is not None and o.request_id]
    return {
        "sent": sum(o is not None for o in load.outcomes), "planned": len(plan), "answered_once": answered,
        "ok": ok, "correct_rankings": by_verdict["correct"], "wrong_rankings": by_verdict["wrong_ranking"],
        "refused_by_code": dict(sorted(refused.items())), "wrong_code": dict(sorted(wrong_code.items())),
        "lost": by_verdict["lost"], "duplicate_request_ids": len(ids) - len(set(ids)),
        "wrong_rankings_by_request": {str(k): [v, ok_by_variant[k]] for k, v in sorted(wrong_by_variant.items())},
        "by_kind": {k: dict(sorted(c.items())) for k, c in by_kind.items()},
        "problems": wrong_examples,
    }


def by_phase(load: LoadResult, health: Health) -> dict[str, dict[str, int]]:
    """Codes by when the call was sent: before the kill, while Triton was down, after SERVING again."""
    phases: dict[str, collections.Counter] = {p: collections.Counter() for p in ("before_kill", "outage", "after")}
    kill = None if load.killed_at is None else load.killed_at - load.started
    up = None if health.up_at is None else health.up_at - load.started
    for out in load.outcomes:
        if out is None:
            continue
        if kill is None or out.sent_s < kill:
            phases["before_kill"][out.code] += 1
        elif up is None or out.sent_s < up:
            phases["outage"][out.code] += 1
        else:
            phases["after"][out.code] += 1
    return {p: dict(sorted(c.items())) for p, c in phases.items()}


def failures(fig: dict) -> list[str]:
    """Why the soak failed ([] when it passed)."""
    out = []
    for key in ("lost", "wrong_rankings", "leaked_processes", "leaked_shm", "duplicate_request_ids"):
        if fig.get(key):
            out.append(f"{key} = {fig[key]}")
    if fig["wrong_code"]:
        out.append(f"wrong codes {fig['wrong_code']}")
    if fig["answered_once"] != fig["planned"]:
        out.append(f"answered once {fig['answered_once']} of {fig['planned']}")
    if fig["server_exit_code"] != 0:
        out.append(f"server exit code {fig['server_exit_code']}")
    if fig["triton_kills"] and not fig["triton_restarted"]:
        out.append("Triton did not come back (health never SERVING again after the kill)")
    if fig.get("kill_error"):
        out.append(fig["kill_error"])
    final = fig.get("final_request") or {}
    if not final.get("correct"):
        out.append(f"the request after the load got {final.get('code')} "
                   f"{'with a wrong ranking' if final.get('code') == 'OK' else ''}".rstrip())
    return out


def format_table(fig: dict) -> str:
    def codes(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    restart = f"{fig['restart_s']:.1f} s to SERVING again" if fig.get("restart_s") is not None else "not restarted"
    rows = [
        ("requests sent", f"{fig['sent']} of {fig['planned']} ({fig['config']['clients']} clients, "
                          f"{fig['config']['distinct_valid']} distinct valid requests)"),
        ("answered exactly once", fig["answered_once"]),
        ("OK answers", fig["ok"]),
        ("  correct rankings (= single client)", fig["correct_rankings"]),
        ("  wrong rankings", f"{fig['wrong_rankings']}" + (
            " (" + ", ".join(f"distinct request #{k}: {v} of its {n} OK answers"
                             for k, (v, n) in fig["wrong_rankings_by_request"].items())
            + ")" if fig["wrong_rankings"] else "")),
        ("refused with the right code", f"{sum(fig['refused_by_code'].values())}: {codes(fig['refused_by_code'])}"),
        ("wrong code", f"{sum(fig['wrong_code'].values())}: {codes(fig['wrong_code'])}"),
        ("lost", fig["lost"]),
        ("Triton SIGKILLed / came back", f"{fig['triton_kills']} / {'yes' if fig['triton_restarted'] else 'NO'} "
                                         f"({restart})"),
        ("  UNAVAILABLE after SERVING again", fig["unavailable_after_serving"]),
        ("leaked processes", f"{fig['leaked_processes']} (of {fig['processes_seen']} seen)"),
        ("leaked shm regions", f"{fig['leaked_shm']} (of {fig['shm_regions_seen']} seen)"),
        ("server RSS before / after / settled", f"{fig['rss_before_mb']} / {fig['rss_after_mb']} / "
                                                f"{fig['rss_settled_mb']} MB"),
        ("a valid request after the load", f"{fig['final_request']['code']}"
                                            f"{', correct' if fig['final_request']['correct'] else ', WRONG'} "
                                            f"(attempt {fig['final_request']['attempts']})"),
        ("server exit code", fig["server_exit_code"]),
        ("duration", f"{fig['duration_s']:.0f} s (load {fig['load_s']:.0f} s)"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append("by kind: " + "; ".join(f"{k}: {codes(v)}" for k, v in fig["by_kind"].items()))
    lines.append("by phase: " + "; ".join(f"{k}: {codes(v)}" for k, v in fig["by_phase"].items()))
    return "\n".join(lines)


def format_markdown(fig: dict) -> str:
    m = fig["machine"]
    return "\n".join([
        f"# pe-rank soak: {fig['config']['requests']} requests, {fig['config']['clients']} clients, Triton killed once",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['mem_total_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}; load average at the start {m['load_average']}.",
        f"Repository: `{fig['config']['repository']}`; model: {fig['model']}.",
        "",
        "```bash", fig["command"], "```", "",
        "```", format_table(fig), "```", "",
        f"Result: **{'PASS' if fig['passed'] else 'FAIL: ' + '; '.join(fig['failures'])}**", "",
    ])


# ---- the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pe-rank soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="exported repository to serve")
    p.add_argument("--requests", type=int, default=300, help="calls in all (default 300)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one channel each (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=Path("examples/dl19_request.json"),
                   help="queries and passages: a request JSON or RankLLM JSON(.gz), e.g. tests/data/bm25_dl19.json.gz")
    p.add_argument("--distinct", type=int, default=8, help="distinct valid requests (each has a reference ranking)")
    p.add_argument("--max-passages", type=int, default=20, help="most passages in a valid request (default 20)")
    p.add_argument("--mix", default="valid=0.5,invalid=0.2,cancelled=0.15,deadline=0.15",
                   help="weights of the request kinds")
    p.add_argument("--kill-at", type=float, default=0.4,
                   help="SIGKILL the embedded tritonserver when this fraction of the plan is sent (0: never)")
    p.add_argument("--resume-at", type=float, default=0.7,
                   help="from this fraction of the plan on, clients wait until health is SERVING again")
    p.add_argument("--backoff-cap", type=float, default=4.0,
                   help="a client refused (UNAVAILABLE, RESOURCE_EXHAUSTED) waits 0.25 s doubling per refusal in a "
                        "row up to this many seconds, so the plan keeps sending through Triton's restart (default 4)")
    p.add_argument("--outage-rate", type=float, default=1.0,
                   help="calls per second, all clients together, while Triton is down (default 1)")
    p.add_argument("--hard-limit", type=float, default=120.0,
                   help="seconds after which a call without a deadline is counted lost (default 120)")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for the server, and for Triton to come back (default 600)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the load before the settled RSS")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra `pe-rank serve` argument, repeatable: --serve-arg=--max-concurrent=4")
    p.add_argument("--server-log", type=Path, help="write the server's output here (default: a temporary file)")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    p.add_argument("--markdown", type=Path, help="write the command, machine and figures as Markdown here")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        fig = run_soak(args, argv)
    except SoakError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(fig))
    print(f"server log: {fig['server_log']}")
    print("PASS" if fig["passed"] else "FAIL: " + "; ".join(fig["failures"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(fig))
    return 0 if fig["passed"] else 1


def _check_args(args: argparse.Namespace) -> None:
    if args.requests < 1 or args.clients < 1 or args.distinct < 1 or args.max_passages < 2:
        raise SoakError("--requests, --clients, --distinct must be >= 1 and --max-passages >= 2")
    if not 0 <= args.kill_at < 1 or not 0 <= args.resume_at <= 1:
        raise SoakError("--kill-at must be in [0, 1) and --resume-at in [0, 1]")
    if args.outage_rate <= 0 or args.backoff_cap < 0 or args.hard_limit <= 0:
        raise SoakError("--outage-rate and --hard-limit must be > 0, --backoff-cap >= 0")
    if not (args.repository / "pe_llm" / "1" / "checkpoint").is_dir():
        raise SoakError(f"{args.repository}: not an exported repository (pe-rank export --repository ...)")
    if any(a.startswith("--port") or a.startswith("--triton-url") for a in args.serve_arg):
        raise SoakError("--serve-arg: the soak chooses the port and needs the embedded Triton (no --port/--triton-url)")


@dataclass
class Drive:
    """What the asynchronous part measured (filled in as it goes, so a failure still reports)."""
    health: Health | None = None
    info: object = None
    invalid: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    ref_latencies: list = field(default_factory=list)
    load: LoadResult | None = None
    load_s: float = 0.0
    rss: dict = field(default_factory=dict)
    pool: list = field(default_factory=list)
    final: dict = field(default_factory=dict)


async def drive(args: argparse.Namespace, target: str, samples: list, plan: list[Spec], server_pid: int,
                watcher: Watcher, out: Drive) -> None:
    """Health SERVING, references, RSS, the load with its kill and health watch, RSS after."""
    out.health = health = Health(target)
    await health.wait_serving(args.ready_timeout)
    out.info = info = await model_info(target)
    out.pool = pool = valid_pool(samples, args.distinct, args.seed, args.max_passages, info.embedding_size)
    text_base = next((m for m in pool if len(m.passages) >= 2 and all(p.text for p in m.passages)), pool[0])
    out.invalid = invalid_requests(text_base, info.embedding_size)
    out.refs, out.ref_latencies = await record_references(target, pool, args.hard_limit)
    timescale = statistics.median(out.ref_latencies)
    out.rss["before"] = rss_mb(server_pid)
    config = LoadConfig(args.clients, args.hard_limit, args.kill_at, args.resume_at, args.ready_timeout, args.seed,
                        args.backoff_cap, args.outage_rate)

    def message(spec: Spec):
        return out.invalid[spec.variant][0] if spec.kind == "invalid" else pool[spec.variant]

    halt = asyncio.Event()
    watching = asyncio.ensure_future(health.watch(halt))
    try:
        out.load = await run_load(target, plan, message, timescale, config, health, watcher)
        out.load_s = time.monotonic() - out.load.started
        if out.load.killed_at is not None and not health.recovered.is_set():
            try:  # the plan ended before Triton was back: wait for it, as the issue asks
                await asyncio.wait_for(health.recovered.wait(), args.ready_timeout)
            except asyncio.TimeoutError:
                pass
    finally:
        halt.set()
        await watching
    out.rss["after"] = rss_mb(server_pid)
    out.final = await final_check(target, pool[0], out.refs[0], args.hard_limit)
    await asyncio.sleep(args.settle)
    out.rss["settled"] = rss_mb(server_pid)


def run_soak(args: argparse.Namespace, argv: list[str]) -> dict:
    """Start the server, reference, load with a kill, stop, count leftovers: the figures."""
    _check_args(args)
    mix = parse_mix(args.mix)
    samples = load_samples(args.data)
    plan = make_plan(args.requests, args.seed, args.distinct, mix)
    t_start = time.monotonic()
    mach = machine()
    log_path = args.server_log or Path(tempfile.mkstemp(prefix="pe-rank-soak-", suffix=".log")[1])
    server = ServerProcess(args.repository, args.serve_arg, log_path)
    watcher = Watcher(server.process.pid)
    watcher.start()
    out = Drive()
    try:
        target = server.wait_ready(args.ready_timeout)
        asyncio.run(drive(args, target, samples, plan, server.process.pid, watcher, out))
        watcher.scan()
    finally:
        exit_code = server.stop(timeout=120.0)
        watcher.halt.set()
        watcher.join(5)
    deadline = time.monotonic() + 10.0  # a SIGKILLed process can take a moment to vanish
    while (left := watcher.leftovers()) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    procs, shm = left
    load, health, info = out.load, out.health, out.info
    fig = summarise(plan, load, out.refs, [f for _, f in out.invalid])
    fig.update({
        "leaked_processes": len(procs), "leaked_process_list": procs, "processes_seen": len(watcher.seen),
        "leaked_shm": len(shm), "leaked_shm_list": shm, "shm_regions_seen": len(watcher.shm_seen),
        "rss_before_mb": out.rss["before"], "rss_after_mb": out.rss["after"], "rss_settled_mb": out.rss["settled"],
        "triton_kills": int(load.killed_at is not None), "kill_error": load.kill_error,
        "triton_restarted": bool(health.recovered.is_set() and len(watcher.tritons) >= 2),
        "tritonserver_pids": sorted(watcher.tritons),
        "kill_at_s": None if load.killed_at is None else round(load.killed_at - load.started, 3),
        "restart_s": None if health.up_at is None or load.killed_at is None else round(health.up_at - load.killed_at, 1),
        "final_request": out.final,
        "distinct_requests": [describe(m) for m in out.pool],
        "health_polls": dict(health.statuses), "by_phase": by_phase(load, health),
        "health_transitions_s": [[round(t - load.started, 2), st] for t, st in health.transitions],
        "unavailable_after_serving": by_phase(load, health)["after"].get("UNAVAILABLE", 0),
        "server_exit_code": exit_code, "duration_s": round(time.monotonic() - t_start, 1),
        "load_s": round(out.load_s, 1),
        "reference_latency_s": {"median": round(statistics.median(out.ref_latencies), 3),
                                "min": round(min(out.ref_latencies), 3), "max": round(max(out.ref_latencies), 3)},
        "model": f"{info.llm}; encoder {info.encoder}",
        "machine": {**mach, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "config": {"requests": args.requests, "clients": args.clients, "seed": args.seed, "mix": mix,
                   "distinct_valid": args.distinct, "max_passages": args.max_passages, "data": str(args.data),
                   "repository": str(args.repository), "serve_args": args.serve_arg, "kill_at": args.kill_at,
                   "resume_at": args.resume_at, "hard_limit_s": args.hard_limit, "backoff_cap_s": args.backoff_cap,
                   "outage_rate": args.outage_rate},
        "command": "pe-rank soak " + shlex.join(argv),
        "server_log": str(log_path),
        "calls": [[o.index, o.kind, o.code, o.sent_s, o.latency_s, o.request_id] for o in load.outcomes if o],
    })
    fig["failures"] = failures(fig)
    fig["passed"] = not fig["failures"]
    return fig
