"""The gRPC ranking service end to end: real Triton, real `pe-rank serve`, real gRPC clients."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import CONFORMANCE, case_id, conformance_cases, metric_of, metrics_page
from test_embedded_triton import group_members, running
from pe_rank.client import AsyncRankerClient, RankerClient
from pe_rank.core.prompt import PromptBuilder
from pe_rank.core.tokenization import load_prompt_tokenizer
from pe_rank.core.types import Passage, RerankRequest
from pe_rank.service.embedded_triton import TritonServer, free_port, shm_regions
from pe_rank.v1 import ranker_pb2 as pb
from pe_rank.v1 import ranker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.triton


# Admission for tests that do not test admission: enough slots and queue wait that a test's own load is never
# refused, however slow the machine (the CLI's defaults, 8 slots and a 2 s wait, refused a test's 16 requests on a
# busy machine). A test of admission passes its own flags after these, which argparse lets win.
TEST_ADMISSION = ("--max-concurrent", "64", "--max-queued", "64", "--max-queue-wait", "300")


class Service:
    """`pe-rank serve` as a subprocess, pointed at Triton servers we control."""

    def __init__(self, repository: Path, triton_urls: list[str], *args: str, root_cert: Path | None = None,
                 api_key: str | None = None, client_cert: Path | None = None, client_key: Path | None = None,
                 ready_timeout: float = 90) -> None:
        """No ``triton_urls``: the service starts (and supervises) its own embedded Triton."""
        self.port, self.metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "pe_rank", "serve", "--repository", str(repository), "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--grace", "5", *TEST_ADMISSION, *args]
        for url in triton_urls:
            cmd += ["--triton-url", url]
        self.log = tempfile.TemporaryFile(mode="w+")  # read back for failure messages, gone on close
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{self.port}"
        self.root_cert, self.client_cert, self.client_key = root_cert, client_cert, client_key
        self.client = RankerClient(self.target, root_cert=root_cert, api_key=api_key, client_cert=client_cert,
                                   client_key=client_key)
        self.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=ready_timeout)

    def channel(self) -> grpc.Channel:
        if self.root_cert:
            return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(
                self.root_cert.read_bytes(), self.client_key.read_bytes() if self.client_key else None,
                self.client_cert.read_bytes() if self.client_cert else None))
        return grpc.insecure_channel(self.target)

    def health(self) -> int:
        with self.channel() as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="pe_rank.v1.Ranker"), timeout=2).status
            except grpc.RpcError:
                return -1

    def wait_health(self, status: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            if self.health() == status:
                return
            time.sleep(0.2)
        raise AssertionError(f"health never became {status}:\n{self.output()}")

    def output(self, tail: int | None = 4000) -> str:
        self.log.seek(0)
        text = self.log.read()
        return text[-tail:] if tail else text

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def services(tritons, exported):
    running: dict[str, Service] = {}

    def get(name: str) -> Service:
        if name not in running:
            running[name] = Service(exported(name), [tritons(name).grpc_url])
        return running[name]

    yield get
    for service in running.values():
        service.stop()


LIVE = 'pe_llm_live_windows{model="pe_llm"}'
LLM_CALLS = 'nv_inference_request_success{model="pe_llm",version="1"}'
PENDING_LLM = 'nv_inference_pending_request_count{model="pe_llm",version="1"}'


def triton_idle(triton: TritonServer) -> bool:
    """No request queued or running in any model, no window live in pe_llm."""
    pending = [float(line.rsplit(" ", 1)[1]) for line in metrics_page(triton).splitlines()
               if line.startswith("nv_inference_pending_request_count{")]
    return sum(pending) == 0 and metric_of(triton, LIVE) == 0


def request_of(case: dict, **extra) -> pb.RerankRequest:
    r = case["request"]
    msg = pb.RerankRequest(query=r["query"], window_size=r["window_size"], stride=r["stride"], **extra)
    for p in r["passages"]:
        msg.passages.add(id=p["id"], text=p["text"])
    return msg


def big_request(dl19, n: int = 100, qi: int = 0) -> pb.RerankRequest:
    q = dl19[qi]
    msg = pb.RerankRequest(query=q["query"])
    for h in q["hits"][:n]:
        msg.passages.add(id=h["docid"], text=h["content"])
    return msg


def thousand(dl19, qi: int) -> pb.RerankRequest:
    """1000 passages: about 100 windows, seconds of work even on the tiny model."""
    msg = pb.RerankRequest(query=dl19[qi]["query"])
    for i in range(10):
        for p in big_request(dl19, 100, qi=(qi + i) % len(dl19)).passages:
            msg.passages.add(id=f"{i}-{p.id}", text=p.text)
    return msg



@pytest.mark.parametrize("item", conformance_cases(), ids=case_id)
def test_conformance_through_the_server(services, item):
    name, _, case = item
    response = services(name).client.rerank(request_of(case))
    assert [r.id for r in response.ranks] == case["expected_ranking"]
    assert [r.index for r in response.ranks] == [
        [p["id"] for p in case["request"]["passages"]].index(i) for i in case["expected_ranking"]]


def test_response_metadata_and_text(services, dl19):
    service = services("tiny-a")
    response = service.client.rerank(big_request(dl19, 30), timeout=60)
    m = response.metadata
    assert (m.windows, m.decode_steps) == (2, 18 + 18) and m.prompt_tokens > 0 and len(m.request_id) == 16
    head = len(PromptBuilder(load_prompt_tokenizer(CONFORMANCE / "tiny-a")).shared_head(20))
    assert m.cached_prompt_tokens in (head, 2 * head)  # the second window's head always comes from the cache
    assert m.timings.total_ms >= m.timings.encode_ms + m.timings.prefill_ms + m.timings.decode_ms > 0
    assert not response.ranks[0].HasField("text")
    with_text = service.client.rerank(pb.RerankRequest(query="fleas", return_text=True, top_n=2,
                                                       passages=[pb.Passage(id="a", text="flea one"),
                                                                 pb.Passage(id="b", text="flea two"),
                                                                 pb.Passage(id="c", text="dog")]))
    assert len(with_text.ranks) == 2
    assert {r.id: r.text for r in with_text.ranks} == {r.id: {"a": "flea one", "b": "flea two", "c": "dog"}[r.id]
                                                        for r in with_text.ranks}


def test_precomputed_embeddings_match_in_process(services, dl19):
    from pe_rank.runtime.inprocess import load_in_process

    model, reranker = load_in_process(CONFORMANCE / "tiny-b")
    q = dl19[2]
    texts = [h["content"] for h in q["hits"][:25]]
    vectors = model.encode(texts)
    request = RerankRequest(q["query"], tuple(Passage(str(i), "", v) for i, v in enumerate(vectors)))
    expected = [r.id for r in asyncio.run(reranker.rerank(request)).ranking]
    msg = pb.RerankRequest(query=q["query"])
    for i, v in enumerate(vectors):
        msg.passages.add(id=str(i), embedding=v.tolist())
    assert [r.id for r in services("tiny-b").client.rerank(msg).ranks] == expected


def test_a_window_of_100_passages(services, dl19):
    msg = big_request(dl19, 100, qi=4)
    msg.window_size, msg.stride = 100, 50
    response = services("tiny-a").client.rerank(msg, timeout=120)
    assert sorted(r.index for r in response.ranks) == list(range(100)) and response.metadata.windows == 1


BAD_REQUESTS = [
    (dict(query="", passages=[pb.Passage(id="a", text="x")]), "query"),
    (dict(query="q"), "passages"),
    (dict(query="q", passages=[pb.Passage(id="a", text="")]), "passages[0].text"),
    (dict(query="q", passages=[pb.Passage(id="a", text="flea " * 900)], truncate=False), "passages[0].text"),
    (dict(query="q", passages=[pb.Passage(id="a", embedding=[0.1] * 5)]), "passages[0].embedding"),
    (dict(query="q", passages=[pb.Passage(id="a", embedding=[float("nan")] * 32)]), "passages[0].embedding"),
    (dict(query="q", passages=[pb.Passage(id="a", embedding=[float("inf")] * 32)]), "passages[0].embedding"),
    (dict(query="q", passages=[pb.Passage(id="a", text="x")], window_size=1), "window_size"),
    (dict(query="q", passages=[pb.Passage(id="a", text="x")], stride=0), "stride"),
    (dict(query="q", passages=[pb.Passage(id="a", text="x")], window_size=10, stride=10), "stride"),
    (dict(query="q", passages=[pb.Passage(id="a", text="x")], top_n=-3), "top_n"),
    (dict(query="q", passages=[pb.Passage(id="a", text="x"), pb.Passage(id="a", text="y")]), "passages[1].id"),
    (dict(query="q", passages=[pb.Passage(id=str(i), text="x") for i in range(1001)]), "passages"),
    (dict(query="<PLACEHOLDER>", passages=[pb.Passage(id="a", text="x")]), "query"),
]


@pytest.mark.parametrize("fields,field", BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_naming_the_field(services, fields, field):
    with pytest.raises(grpc.RpcError) as err:
        services("tiny-a").client.rerank(pb.RerankRequest(**fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")


def test_sixteen_concurrent_requests_are_all_correct(services):
    service = services("tiny-b")
    cases = [c for name, _, c in conformance_cases() if name == "tiny-b"]
    jobs = [cases[i % len(cases)] for i in range(16)]

    async def run_all():
        async with AsyncRankerClient(service.target) as client:
            return await asyncio.gather(*(client.rerank(request_of(c), timeout=120) for c in jobs))

    responses = asyncio.run(run_all())
    for case, response in zip(jobs, responses):
        assert [r.id for r in response.ranks] == case["expected_ranking"]


def test_deadline_exceeded_leaves_no_window(services, tritons, dl19):
    """A 1000-passage request (99 windows) past its deadline: no window is left live in Triton, and the request's
    later windows are never sent."""
    service, triton = services("tiny-a"), tritons("tiny-a")
    before = metric_of(triton, LLM_CALLS)
    with pytest.raises(grpc.RpcError) as err:
        service.client.rerank(thousand(dl19, 7), timeout=0.3)  # seconds of work on any machine
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _settles_to(lambda: metric_of(triton, LIVE), 0)
    _settles_to(lambda: metric_of(triton, PENDING_LLM), 0)
    assert metric_of(triton, LLM_CALLS) - before < 99 // 2, "the request's windows ran on after its deadline"


def test_cancelled_call_leaves_no_window(services, tritons, dl19):
    service, triton = services("tiny-a"), tritons("tiny-a")

    async def cancel_midway():
        async with AsyncRankerClient(service.target) as client:
            call = client.stub.Rerank(thousand(dl19, 8))
            await asyncio.sleep(0.4)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    before = metric_of(triton, LLM_CALLS)
    asyncio.run(cancel_midway())
    _settles_to(lambda: metric_of(triton, LIVE), 0)
    _settles_to(lambda: metric_of(triton, PENDING_LLM), 0)
    assert metric_of(triton, LLM_CALLS) - before < 99 // 2, "the request's windows ran on after its cancel"
    assert services("tiny-a").client.rerank(big_request(dl19, 20), timeout=60).ranks


def _settles_to(probe, expected, within: float = 60.0) -> None:
    """Wait (bounded) until ``probe()`` gives ``expected``: the state a test needs, however slow the machine."""
    deadline = time.monotonic() + within
    while (value := probe()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert value == expected


def test_resource_exhausted_above_max_concurrent(tritons, exported, dl19):
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--max-concurrent", "1", "--max-queued", "0")
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_status_of, service.client, big_request(dl19, 100, qi=i)) for i in range(4)]
            codes = [f.result() for f in futures]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
    finally:
        service.stop()


def _status_of(client: RankerClient, msg) -> grpc.StatusCode:
    try:
        client.rerank(msg, timeout=120)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_triton_down_gives_unavailable_then_recovers(exported, dl19):
    repo = exported("tiny-b")
    triton = TritonServer(repo).start()
    service = Service(repo, [triton.grpc_url], "--embeddings", "cached")
    try:
        assert service.client.rerank(big_request(dl19, 20), timeout=60).ranks
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_status_of, service.client, big_request(dl19, 100, qi=3))
            time.sleep(0.5)
            triton.kill()
            assert pending.result() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK)
        assert _status_of(service.client, big_request(dl19, 20)) == grpc.StatusCode.UNAVAILABLE
        service.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=60)
        triton = TritonServer(repo, grpc_port=triton.grpc_port, http_port=triton.http_port,
                              metrics_port=triton.metrics_port).start()
        service.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=60)
        assert service.client.rerank(big_request(dl19, 20), timeout=60).ranks
        assert service.process.poll() is None
    finally:
        service.stop()
        triton.stop()


def test_requests_spread_over_several_tritons_and_stay_correct(tritons, exported):
    """Two Triton servers behind one service; windows go to either, rankings stay exact."""
    repo = exported("tiny-b")
    second = TritonServer(repo).start()
    service = Service(repo, [tritons("tiny-b").grpc_url, second.grpc_url])
    cases = [c for name, _, c in conformance_cases() if name == "tiny-b"]
    try:
        async def run_all():
            async with AsyncRankerClient(service.target) as client:
                return await asyncio.gather(*(client.rerank(request_of(c), timeout=120) for c in cases * 2))

        for case, response in zip(cases * 2, asyncio.run(run_all())):
            assert [r.id for r in response.ranks] == case["expected_ranking"]
        # no pinning: gRPC's round_robin gives both Tritons windows
        assert metric_of(tritons("tiny-b"), LLM_CALLS) > 0 and metric_of(second, LLM_CALLS) > 0
    finally:
        service.stop()
        second.stop()


def _stuck_bytes(port: int) -> int:
    """The most bytes waiting unread on one established connection to a local ``port`` (from /proc/net/tcp):
    a call sent to a process that is stopped (SIGSTOP) piles up there."""
    most = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, state, queues = fields[1], fields[3], fields[4]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
                    most = max(most, int(queues.split(":")[1], 16))
    return most


def test_a_request_survives_losing_its_triton_when_another_is_ready(exported, dl19):
    """A window call in flight on a Triton that dies fails UNAVAILABLE, is sent again to the other Triton, and the
    request gets its whole, correct ranking. The first Triton is frozen (SIGSTOP) before the request: its
    connection stays up, so round_robin sends it the request's next call, which waits there, unread; once that
    call is seen waiting (its bytes in the socket's queue), the Triton is killed."""
    repo = exported("tiny-a")
    first, second = TritonServer(repo).start(), TritonServer(repo).start()
    service = Service(repo, [first.grpc_url, second.grpc_url])
    long_request = big_request(dl19, 100, qi=9)
    for h in dl19[10]["hits"] + dl19[11]["hits"]:  # 300 passages: 29 windows
        long_request.passages.add(id=f"x{len(long_request.passages)}", text=h["content"])
    window_bytes = 20 * 64 * 4  # a window's PASSAGE_EMBEDS alone (tiny-a: hidden 64); health probes are ~100 bytes
    try:
        expected = [r.id for r in service.client.rerank(long_request, timeout=300).ranks]
        os.killpg(first.process.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(service.client.rerank, long_request, 300)
            deadline = time.monotonic() + 60
            while _stuck_bytes(first.grpc_port) < window_bytes:
                assert time.monotonic() < deadline and not pending.done(), "no call ever reached the frozen Triton"
                time.sleep(0.05)
            first.kill()
            assert [r.id for r in pending.result().ranks] == expected
        assert "retrying on another Triton" in service.output(tail=None)
        assert service.client.rerank(big_request(dl19, 20), timeout=60).ranks
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.process.pid, signal.SIGCONT)
        service.stop()
        first.stop()
        second.stop()


def test_cached_embeddings_hit_on_repeat(tritons, exported, dl19):
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--embeddings", "cached")
    try:
        first = service.client.rerank(big_request(dl19, 40, qi=5), timeout=60)
        second = service.client.rerank(big_request(dl19, 40, qi=5), timeout=60)
        assert first.metadata.cache_hits == 0 and second.metadata.cache_hits == 40
        assert [r.id for r in first.ranks] == [r.id for r in second.ranks]
        assert "pe_rank_embedding_cache_hits_total 40.0" in metrics_page(service).splitlines()
    finally:
        service.stop()


def test_model_info_health_reflection_and_metrics(services):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    service = services("tiny-a")
    service.client.rerank(pb.RerankRequest(query="q", passages=[pb.Passage(id="a", text="x")]), timeout=30)
    assert _status_of(service.client, pb.RerankRequest(query="q")) == grpc.StatusCode.INVALID_ARGUMENT
    info = service.client.model_info()
    assert (info.hidden_size, info.embedding_size, info.max_passages) == (64, 32, 1000)
    assert (info.max_query_chars, info.max_message_bytes, info.max_encoder_tokens) == (4096, 64 << 20, 512)
    assert (info.min_window_size, info.max_window_size, info.max_concurrent_requests) == (2, 100, 64)
    assert (info.max_queued_requests, info.max_queue_wait_ms, info.max_request_ms) == (64, 300_000, 60000)  # as set
    from pe_rank.service.cli import build_parser

    defaults = build_parser().parse_args([])  # what a server without these flags reports
    assert (defaults.max_concurrent, defaults.max_queued, defaults.max_queue_wait) == (8, 16, 2.0)
    assert info.max_text_bytes == 8 << 20
    assert "triton_urls" not in pb.ModelInfo.DESCRIPTOR.fields_by_name  # where Triton runs is not the client's
    assert not [f for f in info.ListFields() if "127.0.0.1" in str(f[1])]
    assert info.embedding_mode == "exact" and "pe_llm" in info.triton_models
    assert service.health() == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(service.target) as channel:
        names = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "pe_rank.v1.Ranker" in names and "grpc.health.v1.Health" in names
    text = metrics_page(service)
    assert 'pe_rank_requests_total{status="OK"}' in text
    assert 'pe_rank_requests_total{status="INVALID_ARGUMENT"}' in text
    assert "pe_rank_request_duration_seconds_bucket" in text and "pe_rank_requests_in_flight" in text
    assert "pe_rank_requests_queued" in text
    assert "pe_rank_prompt_tokens_cached_total" in text




def test_the_work_counters_add_up_to_what_requests_did(services, dl19):
    """pe_rank_passages_total, _windows_total, _decode_steps_total, _prompt_tokens(_cached)_total and
    _embedding_cache_hits_total grow by exactly what each response's metadata says it did."""
    service = services("tiny-b")
    names = ("passages", "windows", "decode_steps", "prompt_tokens", "prompt_tokens_cached", "embedding_cache_hits")
    before = {n: metric_of(service, f"pe_rank_{n}_total") for n in names}
    done = [service.client.rerank(big_request(dl19, n, qi=14), timeout=120) for n in (30, 7, 30)]
    grown = {n: metric_of(service, f"pe_rank_{n}_total") - before[n] for n in names}
    assert grown == {"passages": 67, "windows": sum(r.metadata.windows for r in done),
                     "decode_steps": sum(r.metadata.decode_steps for r in done),
                     "prompt_tokens": sum(r.metadata.prompt_tokens for r in done),
                     "prompt_tokens_cached": sum(r.metadata.cached_prompt_tokens for r in done),
                     "embedding_cache_hits": sum(r.metadata.cache_hits for r in done)}, grown
    assert grown["windows"] == 2 + 1 + 2 and grown["decode_steps"] == 18 + 18 + 5 + 18 + 18
    assert grown["embedding_cache_hits"] >= 30  # the repeated request's windows came from the (exact) cache


def test_a_dns_target_and_several_host_names(exported, tritons, dl19):
    """--triton-url dns:///NAME:PORT (a headless Service's name) is one balanced target; several host names are
    refused with one line before anything starts."""
    triton = tritons("tiny-a")
    service = Service(exported("tiny-a"), [f"dns:///localhost:{triton.grpc_port}"])
    try:
        assert service.client.rerank(big_request(dl19, 20), timeout=60).ranks
        assert f"(Triton: dns:///localhost:{triton.grpc_port})" in service.output(tail=None)
    finally:
        service.stop()
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "serve", "--repository", str(exported("tiny-a")),
                           "--triton-url", "triton-a:8001", "--triton-url", "triton-b:8001"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --triton-url triton-a:8001: several Tritons")


def test_sigterm_turns_health_not_serving_and_drains_in_flight_requests(tritons, exported, dl19):
    """SIGTERM: health watchers see NOT_SERVING at once; every call after that is refused with UNAVAILABLE
    (HTTP 503 + Retry-After), never cancelled by a stopping transport, while the request in flight (29 windows)
    still gets its whole ranking; then the server exits 0 without waiting out --grace for an open Watch."""
    triton = tritons("tiny-a")
    http_port = free_port()
    service = Service(exported("tiny-a"), [triton.grpc_url], "--grace", "600", "--max-request-time", "0",
                      "--http-port", str(http_port))
    request = big_request(dl19, 100, qi=15)
    for h in dl19[16]["hits"] + dl19[17]["hits"]:  # 300 passages: 29 windows
        request.passages.add(id=f"x{len(request.passages)}", text=h["content"])
    try:
        with service.channel() as channel, ThreadPoolExecutor(1) as pool:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="pe_rank.v1.Ranker"), timeout=600)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            before = metric_of(triton, LLM_CALLS)
            pending = pool.submit(service.client.rerank, request, 600)
            deadline = time.monotonic() + 120
            while metric_of(triton, LLM_CALLS) == before:  # under way: its first window answered
                assert time.monotonic() < deadline and not pending.done()
                time.sleep(0.02)
            service.process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not pending.done(), "the request ended before SIGTERM: nothing was drained"
            with RankerClient(service.target) as fresh:  # refused by the service itself while the drain runs
                with pytest.raises(grpc.RpcError) as refused:
                    fresh.rerank(big_request(dl19, 5), timeout=120)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "shutting down" in refused.value.details()
            http = httpx.post(f"http://127.0.0.1:{http_port}/rerank", timeout=120,
                              json={"query": "fleas", "texts": ["flea", "dog"]})
            assert http.status_code == 503 and http.headers["Retry-After"], http.text
            assert http.json()["error_type"] == "shutting_down"
            assert not pending.done(), "the request ended before the refusals: they were not made during a drain"
            response = pending.result()
            assert sorted(r.index for r in response.ranks) == list(range(300))
            # the Watch is still open: the exit must not wait the 600 s grace for it
            assert service.process.wait(timeout=120) == 0
        log = service.output(tail=None)
        assert "stopping: draining in-flight requests" in log
        assert "UNAVAILABLE" in log and "shutting down" in log
    finally:
        service.stop()


def test_sigterm_past_the_grace_cancels_what_still_ranks_on_both_ports_and_says_why(exported, dl19):
    """Requests that cannot finish within --grace (their Triton is frozen with SIGSTOP mid-request) are cut when
    the grace ends: the gRPC client gets UNAVAILABLE and the HTTP client 503 + Retry-After (both retryable, not a
    bare 500), the log names the grace (not a client cancel), and the server exits 0."""
    repo = exported("tiny-a")
    triton = TritonServer(repo).start()
    http_port = free_port()
    service = Service(repo, [triton.grpc_url], "--grace", "1", "--max-request-time", "0", "--http-port", str(http_port))
    long_request = big_request(dl19, 100, qi=12)
    for h in dl19[13]["hits"] + dl19[14]["hits"]:  # 300 passages: 29 windows
        long_request.passages.add(id=f"x{len(long_request.passages)}", text=h["content"])
    texts = [p.text for p in long_request.passages]
    try:
        with ThreadPoolExecutor(2) as pool:
            grpc_call = pool.submit(_status_of, service.client, long_request)
            http_call = pool.submit(httpx.post, f"http://127.0.0.1:{http_port}/rerank", timeout=300,
                                    json={"query": long_request.query, "texts": texts})
            deadline = time.monotonic() + 120
            while metric_of(service, "pe_rank_requests_in_flight") < 2:  # both ranking: past their Triton pick
                assert time.monotonic() < deadline and not grpc_call.done() and not http_call.done()
                time.sleep(0.02)
            os.killpg(triton.process.pid, signal.SIGSTOP)  # the next window of each waits there
            assert not grpc_call.done() and not http_call.done(), "a request finished before Triton was frozen"
            service.process.send_signal(signal.SIGTERM)
            assert service.process.wait(timeout=120) == 0
            assert grpc_call.result() == grpc.StatusCode.UNAVAILABLE
            answered = http_call.result()
            assert answered.status_code == 503 and answered.headers["Retry-After"], answered.text
            assert answered.json()["error_type"] == "shutting_down"
        log = service.output(tail=None)
        assert "grace of 1 s over with 2 requests still ranking" in log
        assert log.count("the shutdown grace (--grace) ran out before the ranking finished") == 2, log
        assert "cancelled by the client" not in log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(triton.process.pid, signal.SIGCONT)
        service.stop()
        triton.stop()


def test_cli_rerank_through_the_server(services, dl19, tmp_path):
    service = services("tiny-a")
    q = dl19[0]
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"query": q["query"], "top_n": 5,
                               "passages": [{"id": h["docid"], "text": h["content"]} for h in q["hits"][:25]]}))
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "rerank", "--server", service.target, "--input", str(req),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    remote = json.loads(proc.stdout)
    local = subprocess.run([sys.executable, "-m", "pe_rank", "rerank", "--model", str(CONFORMANCE / "tiny-a"),
                            "--input", str(req), "--json"], capture_output=True, text=True, timeout=120)
    assert [r["id"] for r in remote["ranking"]] == [r["id"] for r in json.loads(local.stdout)["ranking"]]
    assert len(remote["ranking"]) == 5


def test_tls(tritons, exported, tmp_path, dl19):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    http_port = free_port()
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--tls-cert", str(cert), "--tls-key", str(key),
                      "--http-port", str(http_port), root_cert=cert)
    try:
        assert service.client.rerank(big_request(dl19, 5), timeout=60).ranks
        # the HTTP APIs serve HTTPS with the same certificate, and refuse plaintext
        texts = [h["content"] for h in dl19[0]["hits"][:5]]
        ranks = httpx.post(f"https://127.0.0.1:{http_port}/rerank", json={"query": dl19[0]["query"], "texts": texts},
                           verify=ssl.create_default_context(cafile=str(cert)), timeout=60).json()
        assert sorted(r["index"] for r in ranks) == list(range(5))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=10)
        with RankerClient(service.target) as plaintext, pytest.raises(grpc.RpcError) as err:
            plaintext.rerank(big_request(dl19, 5), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop()


def test_one_llm_call_per_window(services, tritons, dl19):
    """Triton's own counter: a 100-passage request at 20/10 makes exactly 9 pe_llm calls, one per window."""
    service, triton = services("tiny-b"), tritons("tiny-b")
    before = metric_of(triton, LLM_CALLS)
    response = service.client.rerank(big_request(dl19, 100, qi=6), timeout=120)
    assert response.metadata.windows == 9
    _settles_to(lambda: metric_of(triton, LLM_CALLS) - before, 9)


def test_abandoned_requests_stop_and_leave_valid_ones_alone(services, tritons, dl19):
    """A bounded storm: each round, 20 requests with a 0.3 s deadline and 20 cancelled after 0.5 s, then one
    valid request. Abandoned windows stop at their next step inside Triton and their later windows and
    encodings are never sent: far fewer pe_llm calls than the storm's 1080 windows; once Triton is idle
    again (only calls already running finish; a bounded wait), the valid request runs about as fast as on a
    quiet server (it was 40-55x slower when abandoned work ran on; the bound, 4x the quiet time measured in
    this test, leaves room for a busy machine)."""
    service, triton = services("tiny-a"), tritons("tiny-a")
    valid = big_request(dl19, 100, qi=12)
    abandoned = [big_request(dl19, 100, qi=13 + i % 5) for i in range(20)]

    async def timed(client) -> float:
        t0 = time.perf_counter()
        await client.rerank(valid, timeout=120)
        return time.perf_counter() - t0

    async def storm_round(client, settle_s: float) -> float:
        calls = [client.stub.Rerank(msg, timeout=0.3) for msg in abandoned]
        cancelled = [client.stub.Rerank(msg) for msg in abandoned]
        await asyncio.sleep(0.5)
        for call in cancelled:
            call.cancel()
        outcomes = await asyncio.gather(*calls, *cancelled, return_exceptions=True)
        assert all(isinstance(o, (grpc.RpcError, asyncio.CancelledError)) for o in outcomes), outcomes
        t0 = time.perf_counter()
        while not triton_idle(triton):
            assert time.perf_counter() - t0 < settle_s, \
                f"abandoned work still runs in Triton {settle_s:.1f} s after its clients left"
            await asyncio.sleep(0.05)
        return await timed(client)

    async def run() -> tuple[list[float], list[float]]:
        async with AsyncRankerClient(service.target) as client:
            await timed(client)  # warm
            quiet = [await timed(client) for _ in range(3)]
            stormy = [await storm_round(client, settle_s=120.0) for _ in range(3)]
            return quiet, stormy

    calls_before = metric_of(triton, LLM_CALLS)
    quiet, stormy = asyncio.run(run())
    _settles_to(lambda: metric_of(triton, LIVE), 0)
    assert "pe_rank_requests_in_flight 0.0" in metrics_page(service)  # no handler runs on
    # 120 abandoned requests of 9 windows each: had they run on, pe_llm would have answered over 1000 windows
    assert metric_of(triton, LLM_CALLS) - calls_before < 120 * 9 / 2
    assert np.median(stormy) <= 4 * np.median(quiet), (quiet, stormy)


def test_every_limit_in_model_info_is_the_one_enforced(services):
    """GetModelInfo's limits are the service's: at the limit accepted, one past it refused."""
    client = services("tiny-a").client
    info = client.model_info()
    one = [pb.Passage(id="a", text="x"), pb.Passage(id="b", text="y")]
    assert client.rerank(pb.RerankRequest(query="q" * info.max_query_chars, passages=one), timeout=60).ranks
    assert _invalid_field(client, pb.RerankRequest(query="q" * (info.max_query_chars + 1), passages=one)) == "query"
    many = [pb.Passage(id=str(i), text="x") for i in range(info.max_passages + 1)]
    assert _invalid_field(client, pb.RerankRequest(query="q", passages=many)) == "passages"
    assert _invalid_field(client, pb.RerankRequest(query="q", passages=one,
                                                   window_size=info.max_window_size + 1)) == "window_size"
    assert _invalid_field(client, pb.RerankRequest(query="q", passages=one,
                                                   window_size=info.min_window_size - 1)) == "window_size"
    long_text = "flea " * (info.max_encoder_tokens + 10)
    assert _invalid_field(client, pb.RerankRequest(query="q", passages=[pb.Passage(id="a", text=long_text)],
                                                   truncate=False)) == "passages[0].text"
    # past the message size: the server refuses it (this channel would send up to 128 MiB)
    big = pb.RerankRequest(query="q", passages=[pb.Passage(id="a", text="x" * info.max_message_bytes)])
    with grpc.insecure_channel(services("tiny-a").target,
                               options=[("grpc.max_send_message_length", 128 << 20)]) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RankerStub(channel).Rerank(big, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()


def _invalid_field(client: RankerClient, msg: pb.RerankRequest) -> str:
    with pytest.raises(grpc.RpcError) as err:
        client.rerank(msg, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return err.value.details().split(":", 1)[0]


# ---- the embedded Triton, supervised by `pe-rank serve`

def _tritonserver_of(service: Service) -> int:
    """The pid of the service's embedded tritonserver (its direct child)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except FileNotFoundError:
                continue
            name, fields = stat.split("(", 1)[1].rsplit(")", 1)
            if name == "tritonserver" and int(fields.split()[1]) == service.process.pid and running(int(entry)):
                return int(entry)
    raise AssertionError("no running tritonserver child:\n" + service.output())


def test_a_killed_embedded_triton_is_restarted_under_load(exported, dl19, tmp_path):
    """With API keys, so the restarted Triton is a locked one (mutual TLS, HTTP off) the server still reaches."""
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    service = Service(exported("tiny-b"), [], "--triton-backoff", "0.5", "--api-key-file", str(keys), api_key="k1",
                      ready_timeout=300)
    prefix = f"pe_rank_triton_{service.process.pid}_"
    try:
        first = _tritonserver_of(service)
        first_group = group_members(first)
        assert len(first_group) > 1 and shm_regions(prefix)  # Triton, its Python stubs, their shm
        codes: list[grpc.StatusCode] = []
        done = threading.Event()

        def load(qi: int) -> None:  # a real client sending requests back to back
            while not done.is_set():
                codes.append(_status_of(service.client, big_request(dl19, 60, qi=qi)))

        workers = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        try:
            wait = time.monotonic() + 120
            while grpc.StatusCode.OK not in codes and time.monotonic() < wait:
                time.sleep(0.1)
            os.kill(first, signal.SIGKILL)
            killed_at = time.monotonic()
            service.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
            service.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=300)
            print(f"SERVING again {time.monotonic() - killed_at:.1f} s after the kill")
            # calls right after SERVING get through: they got UNAVAILABLE while the calls' own channel was
            # still reconnecting (the soak saw it in about half its runs)
            with ThreadPoolExecutor(3) as pool:
                right_after = list(pool.map(lambda qi: _status_of(service.client, big_request(dl19, 20, qi=qi)),
                                            range(3)))
            assert right_after == [grpc.StatusCode.OK] * 3, right_after
            served_again = len(codes)
            wait = time.monotonic() + 60
            while grpc.StatusCode.OK not in codes[served_again:] and time.monotonic() < wait:
                time.sleep(0.1)
        finally:
            done.set()
            for w in workers:
                w.join()
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert grpc.StatusCode.UNAVAILABLE in codes and grpc.StatusCode.OK in codes[served_again:]
        second = _tritonserver_of(service)
        assert second != first and "Triton restarted" in service.output(tail=None)
        assert not [m for m in first_group if running(m)], "a stub of the killed Triton lives on"
        second_group = group_members(second)
        assert service.client.rerank(big_request(dl19, 20), timeout=60).ranks
        launch = next(line for line in service.output(tail=None).splitlines() if "starting Triton:" in line)
        lock = Path(launch.split("--grpc-server-cert=")[1].split()[0]).parent
        assert lock.is_dir() and oct(lock.stat().st_mode & 0o777) == "0o700"
    finally:
        service.stop()
    assert service.process.returncode == 0
    assert not [m for m in first_group + second_group if running(m)]
    assert not shm_regions(prefix), "shared memory left behind"
    assert not lock.exists(), "the Triton's keys were left behind"


def test_serve_exits_non_zero_when_triton_cannot_be_restarted(exported, tmp_path):
    repo = shutil.copytree(exported("tiny-b"), tmp_path / "repo", symlinks=True)
    service = Service(repo, [], "--triton-max-failures", "2", "--triton-backoff", "0.2", ready_timeout=300)
    prefix = f"pe_rank_triton_{service.process.pid}_"
    try:
        triton = _tritonserver_of(service)
        group = group_members(triton)
        repo.rename(tmp_path / "moved")  # every restart now fails
        os.kill(triton, signal.SIGKILL)
        code = service.process.wait(timeout=180)
        output = service.output(tail=None)
    finally:
        service.stop()
    assert code == 69, output
    assert "failed 2 time(s) in a row" in output
    assert not [m for m in group if running(m)]
    assert not shm_regions(prefix)


# ---- who may call: API keys and mutual TLS

def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate it signed, and a rogue
    client certificate from another CA: real X.509 files, made with the openssl CLI."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", *ec, "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"), "-days", "1",
                 "-subj", f"/CN=pe-rank test {ca}")
    leaves = {"server": ("ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
              "client": ("ca", "extendedKeyUsage=clientAuth"), "rogue": ("rogue-ca", "extendedKeyUsage=clientAuth")}
    for name, (ca, ext) in leaves.items():
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"), "-CAkey",
                 str(d / f"{ca}.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1",
                 "-extfile", str(d / f"{name}.ext"))
    return {p.stem if p.suffix == ".pem" else p.name: p for p in d.iterdir()}


def _unauthenticated_counts(service: Service) -> dict[str, float]:
    lines = metrics_page(service).splitlines()
    return {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("pe_rank_unauthenticated_requests_total{")}


def test_api_keys_and_mutual_tls(tritons, exported, tmp_path, dl19):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    pki = _make_pki(tmp_path)
    keys = tmp_path / "api-keys"
    keys.write_text("# one key per line\nright-key-1\nright-key-2\n")
    tls = dict(root_cert=pki["ca"], client_cert=pki["client"], client_key=tmp_path / "client.key")
    # health is checked by Service with the client certificate but without a key: it stays open
    http_port = free_port()
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--tls-cert", str(pki["server"]),
                      "--tls-key", str(tmp_path / "server.key"), "--tls-client-ca", str(pki["ca"]),
                      "--api-key-file", str(keys), "--http-port", str(http_port), api_key="right-key-2", **tls)
    request = big_request(dl19, 5)
    try:
        # HTTPS: the same mutual TLS (no client certificate, or one from another CA: no connection), then the key
        url, body = f"https://127.0.0.1:{http_port}/v2/rerank", {"query": "fleas", "documents": ["flea", "dog"]}
        key = {"Authorization": "Bearer right-key-1"}

        def https(cert: Path | None, key_file: Path | None) -> httpx.Client:
            context = ssl.create_default_context(cafile=str(pki["ca"]))
            if cert:
                context.load_cert_chain(str(cert), str(key_file))
            return httpx.Client(verify=context, timeout=30)

        with https(pki["client"], tmp_path / "client.key") as client:
            assert client.post(url, json=body, headers=key).status_code == 200
            assert client.post(url, json=body).status_code == 401
            assert client.get(f"https://127.0.0.1:{http_port}/health").status_code == 200
        for cert, key_file in ((None, None), (pki["rogue"], tmp_path / "rogue.key")):
            with https(cert, key_file) as client, pytest.raises(httpx.TransportError):
                client.post(url, json=body, headers=key)
        assert service.client.rerank(request, timeout=60).ranks
        assert service.client.model_info(timeout=10).max_passages == 1000
        for api_key, reason in ((None, "missing API key"), ("wrong-key", "invalid API key"),
                                ("right-key-1x", "invalid API key")):
            with RankerClient(service.target, api_key=api_key, **tls) as client:
                for call in (lambda: client.rerank(request, timeout=30), lambda: client.model_info(timeout=10)):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert err.value.details().startswith(reason)
        assert _unauthenticated_counts(service) == {"missing": 3.0, "invalid": 4.0}  # 2 gRPC + 1 HTTPS missing
        with service.channel() as channel:  # reflection stays open too (grpcurl, Postman)
            assert "pe_rank.v1.Ranker" in ProtoReflectionDescriptorDatabase(channel).get_services()
        # mutual TLS: without a client certificate, or with one from another CA, no connection at all
        for cert, key in ((None, None), (pki["rogue"], tmp_path / "rogue.key")):
            with RankerClient(service.target, root_cert=pki["ca"], api_key="right-key-2", client_cert=cert,
                              client_key=key) as client, pytest.raises(grpc.RpcError) as err:
                client.rerank(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # the CLI passes the key and the client certificate
        req = tmp_path / "req.json"
        req.write_text(json.dumps({"query": "fleas", "passages": [{"id": "a", "text": "flea"}, {"id": "b", "text": "x"}]}))
        cli = [sys.executable, "-m", "pe_rank", "rerank", "--server", service.target, "--input", str(req), "--json",
               "--tls-ca", str(pki["ca"]), "--tls-client-cert", str(pki["client"]),
               "--tls-client-key", str(tmp_path / "client.key")]
        ok = subprocess.run([*cli, "--api-key-file", str(keys)], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert sorted(r["id"] for r in json.loads(ok.stdout)["ranking"]) == ["a", "b"]
        refused = subprocess.run(cli, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "UNAUTHENTICATED: missing API key" in refused.stderr
    finally:
        service.stop()


def test_api_key_alone_over_plaintext(tritons, exported, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--api-key-file", str(keys), api_key="k1")
    try:
        assert service.client.model_info(timeout=10).max_passages == 1000
        with RankerClient(service.target, api_key="k2") as client, pytest.raises(grpc.RpcError) as err:
            client.model_info(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _unauthenticated_counts(service) == {"invalid": 1.0}
    finally:
        service.stop()


RANKING_ROUTES = {  # every HTTP route that ranks, with a body it accepts
    "/rerank": {"query": "fleas", "texts": ["a flea", "a dog"]},
    "/v1/rerank": {"query": "fleas", "documents": ["a flea", "a dog"]},
    "/v2/rerank": {"query": "fleas", "documents": ["a flea", "a dog"]},
}


def test_with_keys_every_door_is_locked_the_embedded_triton_too(exported, tmp_path):
    """`pe-rank serve --api-key-file` with the HTTP APIs and its own Triton: every HTTP ranking route (and /info)
    answers 401 with WWW-Authenticate without a key or with a wrong one, 200 with a right one, counted like
    gRPC's refusals; /health and /openapi.json stay open. The embedded Triton answers no one but the server:
    a direct inference call (plaintext, or TLS without the server's client certificate) is refused, and its
    HTTP port is closed. A warning at start names what stays open (the metrics ports)."""
    import tritonclient.grpc as tclient
    from tritonclient.utils import InferenceServerException

    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    http_port = free_port()
    service = Service(exported("tiny-a"), [], "--api-key-file", str(keys), "--http-port", str(http_port),
                      api_key="k1", ready_timeout=300)
    base = f"http://127.0.0.1:{http_port}"
    try:
        refused = 0
        for path, body in RANKING_ROUTES.items():
            for headers, reason in (({}, "missing"), ({"Authorization": "Bearer k2"}, "invalid"),
                                    ({"Authorization": "k1"}, "invalid"), ({"Authorization": "Basic azE6"}, "invalid")):
                answer = httpx.post(base + path, json=body, headers=headers, timeout=60)
                assert answer.status_code == 401, (path, headers, answer.text)
                assert answer.headers["www-authenticate"].startswith('Bearer realm="pe-rank"')
                assert ("invalid_token" in answer.headers["www-authenticate"]) == (reason == "invalid")
                assert answer.json()["error_type"] == "unauthenticated"
                refused += 1
            answer = httpx.post(base + path, json=body, headers={"Authorization": "Bearer k1"}, timeout=60)
            assert answer.status_code == 200, answer.text
        assert httpx.get(base + "/info", timeout=30).status_code == 401
        assert httpx.get(base + "/info", headers={"Authorization": "bearer k1"}, timeout=30).status_code == 200
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        assert httpx.get(base + "/openapi.json", timeout=30).status_code == 200
        counts = _unauthenticated_counts(service)
        assert counts == {"missing": len(RANKING_ROUTES) + 1, "invalid": 3.0 * len(RANKING_ROUTES)}, counts
        # the server's own calls go through, over its mutual TLS channel to Triton
        assert service.client.rerank(pb.RerankRequest(query="fleas", passages=[pb.Passage(id="a", text="flea"),
                                                                                pb.Passage(id="b", text="dog")]),
                                     timeout=60).ranks
        # the embedded Triton: no one else gets in
        line = next(line for line in service.output(tail=None).splitlines() if "Triton ready (pid" in line)
        grpc_port = int(line.split("gRPC 127.0.0.1:")[1].split()[0])
        metrics_port = int(line.split("metrics 127.0.0.1:")[1].split()[0])
        ids = tclient.InferInput("TEXT", [1], "BYTES")
        ids.set_data_from_numpy(np.array([b"a flea"], dtype=np.object_))
        for client in (tclient.InferenceServerClient(f"127.0.0.1:{grpc_port}"),
                       tclient.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True)):
            with pytest.raises(InferenceServerException) as err:
                client.infer("pe_embed", [ids], client_timeout=30)
            assert "UNAVAILABLE" in str(err.value.status()), err.value
            client.close()
        launch = next(line for line in service.output(tail=None).splitlines() if "starting Triton:" in line)
        assert "--allow-http=false" in launch and "--http-port" not in launch  # Triton's HTTP API is off
        with pytest.raises(httpx.TransportError):  # and its gRPC port speaks nothing without the certificate
            httpx.post(f"http://127.0.0.1:{grpc_port}/v2/models/pe_embed/infer", timeout=10,
                       json={"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
        output = service.output(tail=None)
        assert f"open door: the embedded Triton's metrics on 127.0.0.1:{metrics_port}" in output
        assert f"open door: the Prometheus port 127.0.0.1:{service.metrics_port}" in output
        assert "--api-key-file" in output.split("pe-rank ready on")[1].splitlines()[1]  # the banner's example
    finally:
        service.stop()


@pytest.mark.parametrize("args,message", [
    (["--api-key-file", "/nonexistent/keys"], "--api-key-file /nonexistent/keys"),
    (["--tls-client-ca", "/nonexistent/ca.pem"], "--tls-client-ca needs --tls-cert"),
])
def test_bad_auth_flags_are_one_line_errors(exported, args, message):
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "serve", "--repository", str(exported("tiny-a")), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
