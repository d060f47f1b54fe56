"""The gRPC ranking service end to end: real Triton, real `pe-rank serve`, real gRPC clients."""
from __future__ import annotations

import asyncio
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
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import CONFORMANCE, case_id, conformance_cases, triton_metric
from test_embedded_triton import group_members, running
from pe_rank.client import AsyncRankerClient, RankerClient
from pe_rank.core.prompt import PromptBuilder
from pe_rank.core.tokenization import load_prompt_tokenizer
from pe_rank.core.types import Passage, RerankRequest
from pe_rank.service.embedded_triton import TritonServer, free_port, shm_regions
from pe_rank.v1 import ranker_pb2 as pb
from pe_rank.v1 import ranker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.triton


class Service:
    """`pe-rank serve` as a subprocess, pointed at Triton servers we control."""

    def __init__(self, repository: Path, triton_urls: list[str], *args: str, root_cert: Path | None = None,
                 api_key: str | None = None, client_cert: Path | None = None, client_key: Path | None = None,
                 ready_timeout: float = 90) -> None:
        """No ``triton_urls``: the service starts (and supervises) its own embedded Triton."""
        self.port, self.metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "pe_rank", "serve", "--repository", str(repository), "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--grace", "5", *args]
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


def triton_idle(triton: TritonServer) -> bool:
    """No request queued or running in any model, no window live in pe_llm."""
    with urllib.request.urlopen(f"http://127.0.0.1:{triton.metrics_port}/metrics") as page:
        pending = [float(line.rsplit(" ", 1)[1]) for line in page.read().decode().splitlines()
                   if line.startswith("nv_inference_pending_request_count{")]
    return sum(pending) == 0 and triton_metric(triton, LIVE) == 0


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
    service, triton = services("tiny-a"), tritons("tiny-a")
    with pytest.raises(grpc.RpcError) as err:
        service.client.rerank(thousand(dl19, 7), timeout=0.3)  # seconds of work on any machine
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _settles_to(lambda: triton_metric(triton, LIVE), 0, within=3.0)


def test_cancelled_call_leaves_no_window(services, tritons, dl19):
    service, triton = services("tiny-a"), tritons("tiny-a")

    async def cancel_midway():
        async with AsyncRankerClient(service.target) as client:
            call = client.stub.Rerank(thousand(dl19, 8))
            await asyncio.sleep(0.4)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    asyncio.run(cancel_midway())
    _settles_to(lambda: triton_metric(triton, LIVE), 0, within=3.0)
    assert services("tiny-a").client.rerank(big_request(dl19, 20), timeout=60).ranks


def _settles_to(probe, expected, within: float) -> None:
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
        service.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        triton = TritonServer(repo, grpc_port=triton.grpc_port, http_port=triton.http_port,
                              metrics_port=triton.metrics_port).start()
        service.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=30)
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
        assert triton_metric(tritons("tiny-b"), LLM_CALLS) > 0 and triton_metric(second, LLM_CALLS) > 0
    finally:
        service.stop()
        second.stop()


def test_a_request_survives_losing_its_triton_when_another_is_ready(exported, dl19):
    repo = exported("tiny-a")
    first, second = TritonServer(repo).start(), TritonServer(repo).start()
    service = Service(repo, [first.grpc_url, second.grpc_url])
    long_request = big_request(dl19, 100, qi=9)
    for h in dl19[10]["hits"] + dl19[11]["hits"]:  # 300 passages: 29 windows, surely in flight below
        long_request.passages.add(id=f"x{len(long_request.passages)}", text=h["content"])
    try:
        expected = [r.id for r in service.client.rerank(long_request, timeout=300).ranks]
        before = triton_metric(first, LLM_CALLS)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(service.client.rerank, long_request, 300)
            deadline = time.monotonic() + 60
            while triton_metric(first, LLM_CALLS) == before and time.monotonic() < deadline:
                time.sleep(0.02)  # idle pool: the request starts on the first server listed
            first.kill()
            assert [r.id for r in pending.result().ranks] == expected
        assert "retrying on another Triton" in service.output()
        assert service.client.rerank(big_request(dl19, 20), timeout=60).ranks
    finally:
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
    assert (info.min_window_size, info.max_window_size, info.max_concurrent_requests) == (2, 100, 8)
    assert (info.max_queued_requests, info.max_queue_wait_ms, info.max_request_ms) == (16, 2000, 60000)
    assert info.max_text_bytes == 8 << 20
    assert "triton_urls" not in pb.ModelInfo.DESCRIPTOR.fields_by_name  # where Triton runs is not the client's
    assert not [f for f in info.ListFields() if "127.0.0.1" in str(f[1])]
    assert info.embedding_mode == "exact" and "pe_llm" in info.triton_models
    assert service.health() == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(service.target) as channel:
        names = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "pe_rank.v1.Ranker" in names and "grpc.health.v1.Health" in names
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics") as page:
        text = page.read().decode()
    assert 'pe_rank_requests_total{status="OK"}' in text
    assert 'pe_rank_requests_total{status="INVALID_ARGUMENT"}' in text
    assert "pe_rank_request_duration_seconds_bucket" in text and "pe_rank_requests_in_flight" in text
    assert "pe_rank_requests_queued" in text
    assert "pe_rank_prompt_tokens_cached_total" in text


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
    before = triton_metric(triton, LLM_CALLS)
    response = service.client.rerank(big_request(dl19, 100, qi=6), timeout=120)
    assert response.metadata.windows == 9
    _settles_to(lambda: triton_metric(triton, LLM_CALLS) - before, 9, within=3.0)


def test_abandoned_requests_stop_and_leave_valid_ones_alone(services, tritons, dl19):
    """A bounded storm: each round, 20 requests with a 0.3 s deadline and 20 cancelled after 0.5 s, then one
    valid request. Abandoned windows stop at their next step inside Triton and their later windows and
    encodings are never sent, so Triton is idle within 3 s of the storm (only calls already running finish)
    and the valid request runs as fast as on a quiet server (it was 40-55x slower when abandoned work ran on)."""
    service, triton = services("tiny-a"), tritons("tiny-a")
    valid = big_request(dl19, 100, qi=12)
    abandoned = [big_request(dl19, 100, qi=13 + i % 5) for i in range(20)]

    async def timed(client) -> float:
        t0 = time.perf_counter()
        await client.rerank(valid, timeout=120)
        return time.perf_counter() - t0

    async def storm_round(client) -> float:
        calls = [client.stub.Rerank(msg, timeout=0.3) for msg in abandoned]
        cancelled = [client.stub.Rerank(msg) for msg in abandoned]
        await asyncio.sleep(0.5)
        for call in cancelled:
            call.cancel()
        outcomes = await asyncio.gather(*calls, *cancelled, return_exceptions=True)
        assert all(isinstance(o, (grpc.RpcError, asyncio.CancelledError)) for o in outcomes), outcomes
        t0 = time.perf_counter()
        while not triton_idle(triton):
            assert time.perf_counter() - t0 < 3.0, "abandoned work still runs in Triton 3 s after its clients left"
            await asyncio.sleep(0.05)
        return await timed(client)

    async def run() -> tuple[list[float], list[float]]:
        async with AsyncRankerClient(service.target) as client:
            await timed(client)  # warm
            quiet = [await timed(client) for _ in range(3)]
            stormy = [await storm_round(client) for _ in range(3)]
            return quiet, stormy

    calls_before = triton_metric(triton, LLM_CALLS)
    quiet, stormy = asyncio.run(run())
    _settles_to(lambda: triton_metric(triton, LIVE), 0, within=3.0)
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics") as page:
        assert "pe_rank_requests_in_flight 0.0" in page.read().decode()  # no handler runs on
    # 120 abandoned requests of 9 windows each: had they run on, pe_llm would have answered over 1000 windows
    assert triton_metric(triton, LLM_CALLS) - calls_before < 120 * 9 / 2
    assert np.median(stormy) <= 1.5 * np.median(quiet), (quiet, stormy)


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


def test_a_killed_embedded_triton_is_restarted_under_load(exported, dl19):
    service = Service(exported("tiny-b"), [], "--triton-backoff", "0.5", ready_timeout=300)
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
    finally:
        service.stop()
    assert service.process.returncode == 0
    assert not [m for m in first_group + second_group if running(m)]
    assert not shm_regions(prefix), "shared memory left behind"


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
    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics") as page:
        lines = page.read().decode().splitlines()
    return {line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("pe_rank_unauthenticated_requests_total{")}


def test_api_keys_and_mutual_tls(tritons, exported, tmp_path, dl19):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    pki = _make_pki(tmp_path)
    keys = tmp_path / "api-keys"
    keys.write_text("# one key per line\nright-key-1\nright-key-2\n")
    tls = dict(root_cert=pki["ca"], client_cert=pki["client"], client_key=tmp_path / "client.key")
    # health is checked by Service with the client certificate but without a key: it stays open
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--tls-cert", str(pki["server"]),
                      "--tls-key", str(tmp_path / "server.key"), "--tls-client-ca", str(pki["ca"]),
                      "--api-key-file", str(keys), api_key="right-key-2", **tls)
    request = big_request(dl19, 5)
    try:
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
        assert _unauthenticated_counts(service) == {"missing": 2.0, "invalid": 4.0}
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


@pytest.mark.parametrize("args,message", [
    (["--api-key-file", "/nonexistent/keys"], "--api-key-file /nonexistent/keys"),
    (["--tls-client-ca", "/nonexistent/ca.pem"], "--tls-client-ca needs --tls-cert"),
])
def test_bad_auth_flags_are_one_line_errors(exported, args, message):
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "serve", "--repository", str(exported("tiny-a")), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
