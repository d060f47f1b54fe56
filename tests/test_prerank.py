"""The encoder pre-rank (a cascade): cosine order first, PE-Rank on the top `depth`, through every door.

- Off, with `depth` 0 or >= n, every conformance ranking is exactly the paper's.
- On, the head is PE-Rank's order of the cosine top-`depth` and the tail is the cosine order,
  checked against a cosine computed here from the model's own encoder.
- A checkpoint's ranking.json gives the defaults a request leaves unset, in-process, through
  pe_rank.v1, TEI (gRPC and HTTP), Cohere/Jina HTTP and the pe_rank Triton model; GetModelInfo
  reports them. A negative `depth` is INVALID_ARGUMENT naming the field at every door.
"""
from __future__ import annotations

import json
import shutil

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tclient
from tritonclient.utils import InferenceServerException

from conftest import CONFORMANCE, conformance_cases, metric_of
from pe_rank.core.checkpoint import CheckpointError, RankingDefaults, read_checkpoint_info
from pe_rank.core.errors import InvalidRequest
from pe_rank.core.prerank import cosine_order, with_defaults
from pe_rank.core.ranker import window_bounds
from pe_rank.core.types import Mode, Passage, RerankRequest
from pe_rank.runtime.inprocess import load_ranker
from pe_rank.v1 import ranker_pb2 as pb

DEFAULTS = {"prerank": True, "depth": 5}
CASES = [c for name, _, c in conformance_cases() if name == "tiny-a" and 8 <= len(c["request"]["passages"]) <= 35]


def request_of(case: dict, **fields) -> RerankRequest:
    r = case["request"]
    return RerankRequest(query=r["query"], passages=tuple(Passage(p["id"], p["text"]) for p in r["passages"]),
                         window_size=r["window_size"], stride=r["stride"], **fields)


def ids(result) -> list[str]:
    return [r.id for r in result.ranking]


def expected_cascade(ranker, case: dict, depth: int) -> list[str]:
    """The cascade computed here: cosine of the model's own encodings, then PE-Rank of the top alone."""
    request = request_of(case)
    texts = [p.text for p in request.passages]
    cosine = cosine_order(ranker.model.encode([request.query])[0], ranker.model.encode(texts))
    head = [request.passages[i] for i in cosine[:depth]]
    head_order = ids(ranker.rank_sync(RerankRequest(request.query, tuple(head), request.window_size, request.stride,
                                                    prerank=False, depth=0)))
    return head_order + [request.passages[i].id for i in cosine[depth:]]


@pytest.fixture(scope="module")
def ranker():
    return load_ranker(CONFORMANCE / "tiny-a")


# ---- the rule


def test_cosine_order_is_by_cosine_with_ties_in_the_given_order():
    query = np.array([1.0, 0.0])
    passages = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [5.0, 0.0], [-1.0, 0.0]])
    assert cosine_order(query, passages) == [1, 3, 2, 0, 4]  # 1 and 3 tie (cosine 1): given order


def test_defaults_fill_only_what_a_request_leaves_unset():
    defaults = RankingDefaults(prerank=True, depth=20)
    req = RerankRequest("q", (Passage("a", "x"),))
    assert (with_defaults(req, defaults).prerank, with_defaults(req, defaults).depth) == (True, 20)
    explicit = RerankRequest("q", (Passage("a", "x"),), prerank=False, depth=0)
    assert (with_defaults(explicit, defaults).prerank, with_defaults(explicit, defaults).depth) == (False, 0)
    text = RerankRequest("q", (Passage("a", "x"),), mode=Mode.TEXT)
    assert with_defaults(text, defaults).prerank is False  # the baseline ranks the given order
    with pytest.raises(InvalidRequest, match="prerank"):
        with_defaults(RerankRequest("q", (Passage("a", "x"),), mode=Mode.TEXT, prerank=True), defaults)


def test_ranking_json_is_read_and_a_bad_one_is_one_line(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(CONFORMANCE / "tiny-a", folder)
    assert read_checkpoint_info(folder).defaults == RankingDefaults()  # no file: the paper's setting
    (folder / "ranking.json").write_text(json.dumps(DEFAULTS))
    assert read_checkpoint_info(folder).defaults == RankingDefaults(prerank=True, depth=5)
    for bad in ('{"prerank": "yes"}', '{"depth": -1}', '{"depht": 3}', "[1]", "{"):
        (folder / "ranking.json").write_text(bad)
        with pytest.raises(CheckpointError, match="ranking.json"):
            read_checkpoint_info(folder)


# ---- in-process


@pytest.mark.parametrize("depth", [0, 1000])
def test_off_with_every_passage_is_exactly_the_conformance_ranking(ranker, depth):
    for case in CASES:
        assert ids(ranker.rank_sync(request_of(case, prerank=False, depth=depth))) == case["expected_ranking"]


def test_on_the_head_is_pe_rank_of_the_cosine_top_and_the_tail_the_cosine_order(ranker):
    for case in CASES:
        for depth in (5, 20):
            result = ranker.rank_sync(request_of(case, prerank=True, depth=depth))
            assert ids(result) == expected_cascade(ranker, case, depth), (len(case["request"]["passages"]), depth)
            assert (result.prerank, result.depth) == (True, min(depth, len(case["request"]["passages"])))
            head = min(depth, len(case["request"]["passages"]))
            assert result.stats.windows == len(window_bounds(head, case["request"]["window_size"],
                                                             case["request"]["stride"]))


def test_off_with_a_depth_reranks_the_given_top_and_keeps_the_rest(ranker):
    case = next(c for c in CASES if len(c["request"]["passages"]) >= 20)
    request = request_of(case, prerank=False, depth=8)
    head = request_of(case, prerank=False, depth=0)
    head = RerankRequest(head.query, head.passages[:8], head.window_size, head.stride, prerank=False, depth=0)
    assert ids(ranker.rank_sync(request)) == ids(ranker.rank_sync(head)) + [p.id for p in request.passages[8:]]


# ---- every door, on a repository whose checkpoint says {"prerank": true, "depth": 5}


@pytest.fixture(scope="module")
def defaults_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prerank") / "tiny-a"
    shutil.copytree(CONFORMANCE / "tiny-a", folder)
    (folder / "ranking.json").write_text(json.dumps(DEFAULTS))
    return folder


@pytest.fixture(scope="module")
def served(defaults_checkpoint, tmp_path_factory):
    from pe_rank.service.embedded_triton import TritonServer
    from pe_rank_export.repository import ExportOptions, export_repository
    from test_rerank_apis import ApiService

    repo = tmp_path_factory.mktemp("prerank-repo")
    export_repository(defaults_checkpoint, repo, ExportOptions(target="torch", gpu=False), log=lambda *_: None)
    with TritonServer(repo) as triton:
        service = ApiService(repo, [triton.grpc_url])
        try:
            yield service, triton
        finally:
            service.stop()


@pytest.mark.triton
def test_every_door_takes_the_models_defaults_and_the_callers_choice(served, defaults_checkpoint):
    service, triton = served
    ranker = load_ranker(defaults_checkpoint)
    case = next(c for c in CASES if len(c["request"]["passages"]) >= 20  # TEI and Cohere rank with 20/10
                and (c["request"]["window_size"], c["request"]["stride"]) == (20, 10))
    texts = [p["text"] for p in case["request"]["passages"]]
    query = case["request"]["query"]
    position = {p["id"]: i for i, p in enumerate(case["request"]["passages"])}
    cascade = [position[i] for i in expected_cascade(ranker, case, 5)]
    paper = [position[i] for i in case["expected_ranking"]]

    info = service.client.model_info(timeout=60)
    assert (info.default_prerank, info.default_depth) == (True, 5)
    # in-process, with the checkpoint's defaults
    assert [position[i] for i in ids(ranker.rank_sync(request_of(case)))] == cascade
    # pe_rank.v1: unset takes the defaults; the caller's choice wins
    unset = service.client.rerank(request_of(case), timeout=120)
    assert [r.index for r in unset.ranks] == cascade
    assert (unset.metadata.prerank, unset.metadata.depth) == (True, 5)
    embeds = 'nv_inference_request_success{model="pe_embed",version="1"}'
    before = metric_of(triton, embeds)
    again = service.client.rerank(request_of(case), timeout=120)  # every vector and window from the cache
    assert [r.index for r in again.ranks] == cascade and metric_of(triton, embeds) == before
    off = service.client.rerank(request_of(case, prerank=False, depth=0), timeout=120)
    assert [r.index for r in off.ranks] == paper and (off.metadata.prerank, off.metadata.depth) == (False, 20)
    # tei.v1 over gRPC (pe-rank's own fields 100, 101)
    assert tei_rerank(service.target, query, texts) == cascade
    assert tei_rerank(service.target, query, texts, prerank=False, depth=0) == paper
    # TEI and Cohere/Jina over HTTP
    tei = httpx.post(f"{service.base_url}/rerank", json={"query": query, "texts": texts, "truncate": True,
                                                          "prerank": False, "depth": 0}, timeout=120)
    assert [r["index"] for r in sorted(tei.json(), key=lambda r: -r["score"])] == paper
    for path in ("/v1/rerank", "/v2/rerank"):
        body = {"model": "m", "query": query, "documents": texts}
        assert [r["index"] for r in httpx.post(service.base_url + path, json=body, timeout=120).json()["results"]] \
            == cascade
        off = httpx.post(service.base_url + path, json={**body, "prerank": False, "depth": 0}, timeout=120)
        assert [r["index"] for r in off.json()["results"]] == paper
    # the pe_rank Triton model
    client = tclient.InferenceServerClient(triton.grpc_url)
    assert client.infer("pe_rank", rank_inputs(query, texts), client_timeout=120).as_numpy("ORDER").tolist() == cascade
    assert client.infer("pe_rank", rank_inputs(query, texts, PRERANK=False, DEPTH=0),
                        client_timeout=120).as_numpy("ORDER").tolist() == paper


@pytest.mark.triton
def test_a_negative_depth_is_refused_naming_the_field_at_every_door(served, tmp_path, capsys):
    from pe_rank.cli import main

    service, triton = served
    texts = ["fleas", "dogs"]
    (tmp_path / "req.json").write_text(json.dumps({"query": "q", "passages": [{"text": t} for t in texts],
                                                   "depth": -1}))
    assert main(["rerank", "--model", str(CONFORMANCE / "tiny-a"), "--input", str(tmp_path / "req.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: depth:")
    with pytest.raises(grpc.RpcError) as err:
        service.client.rerank(pb.RerankRequest(query="q", passages=[pb.Passage(text=t) for t in texts], depth=-1),
                              timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("depth:")
    with pytest.raises(grpc.RpcError) as err:
        tei_rerank(service.target, "q", texts, depth=-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("depth:")
    for path, body in (("/rerank", {"query": "q", "texts": texts}), ("/v1/rerank", {"query": "q", "documents": texts}),
                       ("/v2/rerank", {"query": "q", "documents": texts})):
        answer = httpx.post(service.base_url + path, json={**body, "depth": -1}, timeout=60)
        assert answer.status_code == 422 and answer.json()["field"] == "depth", answer.text
    with pytest.raises(InferenceServerException, match="depth") as err:
        tclient.InferenceServerClient(triton.grpc_url).infer("pe_rank", rank_inputs("q", texts, DEPTH=-1),
                                                             client_timeout=60)
    assert "INVALID_ARG" in str(err.value.status())


def tei_rerank(target: str, query: str, texts: list[str], truncate: bool = True, **extension) -> list:
    """tei.v1 Rerank with pe-rank's own fields (100: prerank, 101: depth) appended on the wire to TEI's
    message, as an extended client sends them: tei-client's stubs, never ours (both define tei.v1)."""
    from google.protobuf.internal.encoder import _VarintBytes
    from tei_client.stubs import tei_pb2

    body = tei_pb2.RerankRequest(query=query, texts=texts, truncate=truncate).SerializeToString()
    for number, value in ((100, extension.get("prerank")), (101, extension.get("depth"))):
        if value is not None:
            body += _VarintBytes(number << 3) + _VarintBytes(int(value) & (2**64 - 1) if value < 0 else int(value))
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/tei.v1.Rerank/Rerank", request_serializer=lambda raw: raw,
                                   response_deserializer=tei_pb2.RerankResponse.FromString)
        ranks = call(body, timeout=120).ranks
    return [r.index for r in sorted(ranks, key=lambda r: -r.score)]


def rank_inputs(query: str, texts: list[str], **options) -> list[tclient.InferInput]:
    def tensor(name: str, array: np.ndarray, dtype: str) -> tclient.InferInput:
        item = tclient.InferInput(name, list(array.shape), dtype)
        item.set_data_from_numpy(array)
        return item

    inputs = [tensor("QUERY", np.array([query.encode()], dtype=np.object_), "BYTES"),
              tensor("PASSAGES", np.array([t.encode() for t in texts], dtype=np.object_), "BYTES")]
    if "PRERANK" in options:
        inputs.append(tensor("PRERANK", np.array([options["PRERANK"]], dtype=np.bool_), "BOOL"))
    if "DEPTH" in options:
        inputs.append(tensor("DEPTH", np.array([options["DEPTH"]], dtype=np.int32), "INT32"))
    return inputs


def test_the_pre_rank_and_depth_count_the_chunks_of_a_long_passage(ranker):
    """A passage over 512 encoder tokens is ranked as its chunks: the pre-rank orders chunks, PE-Rank reorders
    the top `depth` chunks, and each passage takes its best chunk's place (folding is tested in test_chunking)."""
    case = next(c for c in CASES if len(c["request"]["passages"]) >= 8)
    request = request_of(case)
    long_text = " ".join(p.text for p in request.passages)  # every passage's words: well over 512 tokens
    passages = (Passage("long", long_text),) + request.passages[:7]
    request = RerankRequest(request.query, passages, window_size=4, stride=2, prerank=True, depth=6)
    plan = ranker.validate(request)
    chunks = plan.ranked.passages
    assert len(chunks) > len(passages)  # the long passage was split
    cosine = cosine_order(ranker.model.encode([request.query])[0], ranker.model.encode([c.text for c in chunks]))
    head = [chunks[i] for i in cosine[:6]]
    head_order = ranker.rank_sync(RerankRequest(request.query, tuple(head), 4, 2, prerank=False, depth=0))
    by_id = {c.id: k for k, c in enumerate(head)}
    chunk_order = [cosine[by_id[r.id]] for r in head_order.ranking] + cosine[6:]
    want, _ = plan.fold(chunk_order)
    result = ranker.rank_sync(request)
    assert [r.index for r in result.ranking] == want and result.depth == 6 and result.chunking.chunks == len(chunks)
