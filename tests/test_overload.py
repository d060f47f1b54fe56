"""Overload, huge and broken requests, deadlines: what a client gets and what the server logs.

Real `pe-rank serve` subprocesses in front of the shared tiny Triton; gRPC clients on loopback.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import metric_of, metrics_page
from test_server import LIVE, LLM_CALLS, PENDING_LLM, Service, _settles_to, big_request, thousand
from pe_rank.client import AsyncRankerClient
from pe_rank.v1 import ranker_pb2 as pb
from pe_rank.v1 import ranker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.triton


def log_lines(service: Service, request_id: str) -> list[str]:
    return [line for line in service.output(tail=None).splitlines() if request_id in line]


@pytest.fixture(scope="module")
def small(tritons, exported):
    """Two slots and no queue."""
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--max-concurrent", "2", "--max-queued", "0")
    yield service
    service.stop()


# ---- admission


async def _timed(client: AsyncRankerClient, msg: pb.RerankRequest) -> tuple[str, float, dict]:
    """(status, seconds, trailers): an answered request's seconds are the server's own (its total_ms, from
    admission to answer), not the client's, which on a busy machine include sending a dozen large messages."""
    t0 = time.perf_counter()
    call = client.stub.Rerank(msg, timeout=120)
    try:
        response = await call
        return "OK", response.metadata.timings.total_ms / 1e3, {}
    except grpc.RpcError as exc:
        elapsed = time.perf_counter() - t0
        return exc.code().name, elapsed, dict(await call.trailing_metadata() or ())


def test_an_overload_burst_is_refused_at_once_and_the_admitted_keep_their_latency(small, dl19):
    """12 clients at once on 2 slots: about 10 refusals with a retry hint (both trailers); with both slots held by
    long requests, ten more are refused while both still rank (no refusal waits for a slot); the admitted rank
    about as fast as one alone, by the server's own times with every passage already encoded (before admission,
    16 clients made every request 14x slower; two admitted share the cores, so the bound here is 6x the
    single-client time measured in this test, which still tells 2 at once from 12 and leaves room for a machine
    busy with two other processes: 4.3x was seen there; `pe-rank bench` measures the real ratio)."""
    requests = [big_request(dl19, 100, qi=20 + i) for i in range(12)]

    async def held(client: AsyncRankerClient) -> tuple[list[bool], list]:
        """Two long requests hold both slots (seen in flight); ten more are each refused while both still rank."""
        longs = [asyncio.ensure_future(_timed(client, thousand(dl19, qi))) for qi in (30, 31)]
        for _ in range(3000):  # bounded: 150 s
            if metric_of(small, "pe_rank_requests_in_flight") == 2:
                break
            await asyncio.sleep(0.05)
        refusals = await asyncio.gather(*(_timed(client, msg) for msg in requests[:10]))
        holding = [not task.done() for task in longs]
        for task in longs:
            task.cancel()
        await asyncio.gather(*longs, return_exceptions=True)
        return holding, refusals

    async def run():
        async with AsyncRankerClient(small.target) as client:
            for msg in requests:  # warm, and every request's passages in the embedding cache: the burst's admitted
                await _timed(client, msg)  # and the alone ones then do the same work (encoding took 0.4-7 s here)
            alone = [(await _timed(client, requests[i]))[1] for i in range(3)]
            burst = await asyncio.gather(*(_timed(client, msg) for msg in requests))
            return alone, burst, await held(client)

    refused_before = metric_of(small, 'pe_rank_requests_total{status="RESOURCE_EXHAUSTED"}')
    alone, burst, (holding, refusals) = asyncio.run(run())
    admitted = [s for code, s, _ in burst if code == "OK"]
    refused = [(s, md) for code, s, md in burst if code == "RESOURCE_EXHAUSTED"]
    assert len(admitted) + len(refused) == len(burst), burst
    assert len(admitted) >= 2 and len(refused) >= 8, burst
    # refusals never wait for a slot: with both slots held, all ten came back while both holders still ranked
    assert [code for code, _, _ in refusals] == ["RESOURCE_EXHAUSTED"] * 10, refusals
    assert holding == [True, True], "a refusal waited until a slot was free"
    refused += [(s, md) for _, s, md in refusals]
    assert all(int(md["grpc-retry-pushback-ms"]) > 0 for _, md in refused)
    assert all(md["retry-after-ms"] == md["grpc-retry-pushback-ms"] for _, md in refused)
    assert max(admitted) <= 6 * statistics.median(alone), (alone, admitted)
    refused_now = metric_of(small, 'pe_rank_requests_total{status="RESOURCE_EXHAUSTED"}')
    assert refused_now - refused_before == len(refused)
    _settles_to(lambda: metric_of(small, "pe_rank_requests_in_flight"), 0)  # the cancelled holders let go


def test_a_queued_request_waits_for_its_slot_and_the_wait_is_reported(tritons, exported, dl19):
    service = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--max-concurrent", "1", "--max-queued", "4",
                      "--max-queue-wait", "60")
    try:
        async def run():
            async with AsyncRankerClient(service.target) as client:
                return await asyncio.gather(*(client.rerank(big_request(dl19, 100, qi=25 + i), timeout=120)
                                              for i in range(3)))

        responses = asyncio.run(run())
        queued = sorted(r.metadata.timings.queue_ms for r in responses)
        total = sorted(r.metadata.timings.total_ms for r in responses)
        # one slot: the second waited about one request's time, the third about two
        assert queued[0] < 0.5 * total[0] and queued[1] > 0.5 * total[0] and queued[2] > queued[1]
        text = metrics_page(service)
        assert 'pe_rank_request_duration_seconds_count{stage="queue"} 3.0' in text
        assert "pe_rank_requests_queued 0.0" in text and "pe_rank_requests_in_flight 0.0" in text
    finally:
        service.stop()


def test_the_server_bounds_a_request_without_a_deadline(tritons, exported, dl19):
    """--max-request-time: a 1000-passage request with no client deadline ends DEADLINE_EXCEEDED, and its
    windows stop in Triton."""
    triton = tritons("tiny-a")
    service = Service(exported("tiny-a"), [triton.grpc_url], "--max-request-time", "0.5")
    try:
        before = metric_of(triton, LLM_CALLS)
        with pytest.raises(grpc.RpcError) as err:
            service.client.rerank(thousand(dl19, 2))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _settles_to(lambda: metric_of(triton, LIVE), 0)
        _settles_to(lambda: metric_of(triton, PENDING_LLM), 0)
        assert metric_of(triton, LLM_CALLS) - before < 99 // 2, "the request ran on past --max-request-time"
        _settles_to(lambda: metric_of(service, 'pe_rank_requests_total{status="DEADLINE_EXCEEDED"}'), 1)
    finally:
        service.stop()


# ---- the event loop stays free


_SEND_BIG = """
import json, sys, time
import grpc
from pe_rank.v1 import ranker_pb2 as pb, ranker_pb2_grpc as pb_grpc
target, max_text_bytes = sys.argv[1], int(sys.argv[2])
huge = pb.RerankRequest(query="q", truncate=False,
                        passages=[pb.Passage(id=str(i), text="lorem ipsum dolor " * 11_000) for i in range(100)])
assert huge.ByteSize() > 19_000_000
words = "lorem ipsum dolor sit amet " * (max_text_bytes // 100 // 28)  # just under the limit in all
long_texts = pb.RerankRequest(query="q", truncate=False, passages=[pb.Passage(id=str(i), text=words) for i in range(100)])
out = []
with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
    for msg in (huge, long_texts):
        t0 = time.perf_counter()
        try:
            pb_grpc.RankerStub(channel).Rerank(msg, timeout=120)
            out.append(["OK", "", time.perf_counter() - t0])
        except grpc.RpcError as exc:
            out.append([exc.code().name, exc.details(), time.perf_counter() - t0])
print(json.dumps(out))
"""


def test_health_stays_fast_while_huge_requests_are_refused(small):
    """A 20 MB request is refused on its size before anything is tokenized; a request under the size limit
    with over-long texts and truncate=false is token-counted off the event loop. Health checks meanwhile
    answer in less than half the time that request took (one 20 MB request took the loop for 7.4 s before,
    and a health check then waited about as long as the request; measured on an idle machine: under 25 ms
    against 0.25 s). The big requests are built and sent by another process: in this one, their serialization
    would hold the GIL against the health checks' own thread (CI once saw a 146 ms check that way)."""
    info = small.client.model_info()
    worst = 0.0
    with grpc.insecure_channel(small.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        sender = subprocess.Popen([sys.executable, "-c", _SEND_BIG, small.target, str(info.max_text_bytes)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while sender.poll() is None:
            t0 = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.01)
        stdout, stderr = sender.communicate()
    assert sender.returncode == 0, stderr
    outcomes = json.loads(stdout)
    assert [code for code, _, _ in outcomes] == ["INVALID_ARGUMENT"] * 2, outcomes
    assert outcomes[0][1].startswith("passages: ") and "bytes of text exceed the limit" in outcomes[0][1]
    assert outcomes[1][1].startswith("passages[0].text: is over the 512 limit of encoder tokens")
    took = outcomes[1][2]
    assert worst < took / 2, f"a health check took {worst * 1e3:.0f} ms, the request {took * 1e3:.0f} ms"


# ---- codes and log lines


@pytest.mark.parametrize("raw", [
    pb.RerankRequest(query="QQQQ", passages=[pb.Passage(id="a", text="x")]).SerializeToString().replace(
        b"QQQQ", b"\xff\xfe\xfd\xfc"),
    b"\x0a\xff\xff\xff\xff\xff not protobuf",
], ids=["invalid-utf8", "garbage"])
def test_an_undecodable_request_is_invalid_argument_with_one_log_line(small, raw):
    with grpc.insecure_channel(small.target) as channel:
        call = channel.unary_unary("/pe_rank.v1.Ranker/Rerank", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "not a valid pe_rank.v1.RerankRequest message" in details
    assert "Error" not in details and "<class" not in details  # no Python exception names
    request_id = details.rsplit("(request ", 1)[1].rstrip(")")
    lines = log_lines(small, request_id)
    assert len(lines) == 1 and "INFO" in lines[0] and "INVALID_ARGUMENT" in lines[0], lines
    assert "Traceback" not in small.output(tail=None)


def test_an_undecodable_message_in_a_tei_stream_is_invalid_argument(small):
    good = b"\x0a\x01q\x12\x01a"  # RerankStreamRequest(query="q", text="a")
    bad = b"\x0a\x01q\x12\x01\xff"  # text holding invalid UTF-8
    with grpc.insecure_channel(small.target) as channel:
        call = channel.stream_unary("/tei.v1.Rerank/RerankStream", request_serializer=None,
                                    response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(iter([good, bad]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tei.v1.RerankStreamRequest message" in err.value.details()


def test_a_client_deadline_is_logged_as_deadline_exceeded_and_a_cancel_as_cancelled(small, dl19):
    before = {code: metric_of(small, f'pe_rank_requests_total{{status="{code}"}}')
              for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    for i in range(3):
        with pytest.raises(grpc.RpcError) as err:
            small.client.rerank(thousand(dl19, 5 + i), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def cancel_midway():
        async with AsyncRankerClient(small.target) as client:
            call = client.stub.Rerank(thousand(dl19, 9))
            await asyncio.sleep(0.5)
            call.cancel()

    asyncio.run(cancel_midway())
    _settles_to(lambda: metric_of(small, 'pe_rank_requests_total{status="CANCELLED"}') - before["CANCELLED"], 1)
    # 18 of 20 deadlines were logged and counted as CANCELLED before
    _settles_to(lambda: metric_of(small, 'pe_rank_requests_total{status="DEADLINE_EXCEEDED"}')
                - before["DEADLINE_EXCEEDED"], 3)
    lines = small.output(tail=None).splitlines()
    assert len([line for line in lines if " DEADLINE_EXCEEDED in " in line]) >= 3
    assert len([line for line in lines if " CANCELLED in " in line]) >= 1
