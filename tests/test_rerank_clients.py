"""NVIDIA NIM's reranking API, /rerank's two bodies, Infinity's shape and long documents as chunks,
tested with the real, unmodified clients against a real `pe-rank serve` and a real Triton on loopback:
langchain-nvidia-ai-endpoints' NVIDIARerank, LiteLLM's nvidia_nim/, hosted_vllm/ and infinity/ providers
and the cohere SDK. Each gets the conformance ranking (the same as pe_rank.v1's), and its own error type
for a bad request, naming the field."""
from __future__ import annotations

import json
import os
import warnings

import httpx
import pytest

from conftest import CONFORMANCE
from pe_rank.core.chunking import Chunker
from pe_rank.core.ranker import window_bounds
from pe_rank.v1 import ranker_pb2 as pb
from test_rerank_apis import CASES, T, ApiService, expected_indices, texts_of

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import
pytestmark = pytest.mark.triton
CASE_IDS = [f"n{len(c['request']['passages'])}" for c in CASES]


MAX_CHUNKS = 1000  # --max-chunks (default 10,000), low enough to pass cheaply


@pytest.fixture(scope="module")
def service(tritons, exported):
    running = ApiService(exported("tiny-a"), [tritons("tiny-a").grpc_url], "--max-chunks", str(MAX_CHUNKS))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chunker(exported) -> Chunker:
    """The exported repository's encoder tokenizer: what the server plans chunks with."""
    return Chunker.from_file(exported("tiny-a") / "pe_tokenizer" / "1" / "tokenizer" / "tokenizer.json")


def _litellm():
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def _v1(service, query: str, texts: list[str], **fields) -> pb.RerankResponse:
    return service.client.rerank(pb.RerankRequest(query=query, passages=[pb.Passage(id=str(i), text=t)
                                                                         for i, t in enumerate(texts)], **fields),
                                 timeout=T)


# ---- NVIDIA NIM: /v1/ranking, /v1/retrieval/{model}/reranking, /v1/models


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nim_clients_rank_like_the_conformance_case(service, case):
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    litellm = _litellm()
    query, texts, expected = case["request"]["query"], texts_of(case), expected_indices(case)
    n = len(texts)
    # NVIDIARerank sends batches of max_batch_size (32) and merges them by logit: with 1/rank logits,
    # a list must go in one batch (README), so the batch is the list here
    ranker = NVIDIARerank(base_url=f"{service.base_url}/v1", model="pe-rank", top_n=n, max_batch_size=n)
    ranked = ranker.compress_documents(query=query, documents=[Document(page_content=t) for t in texts])
    assert [texts.index(d.page_content) for d in ranked] == expected
    assert [d.metadata["relevance_score"] for d in ranked] == pytest.approx([1 / (k + 1) for k in range(n)])

    # LiteLLM: nvidia_nim/<model> posts to the per-model path, nvidia_nim/ranking/<model> to /v1/ranking
    for model in ("nvidia_nim/nvidia/llama-3_2-nv-rerankqa-1b-v2", "nvidia_nim/ranking/pe-rank"):
        top = litellm.rerank(model=model, query=query, documents=texts, api_base=service.base_url,
                             api_key="unused", top_n=min(3, n))
        assert [r["index"] for r in top.results] == expected[:3], model
        everything = litellm.rerank(model=model, query=query, documents=texts, api_base=service.base_url,
                                    api_key="unused")
        assert [r["index"] for r in everything.results] == expected, model
        assert [r["document"]["text"] for r in everything.results] == [texts[i] for i in expected]


def test_nvidia_rerank_without_a_model_lists_v1_models(service):
    """Without a model, NVIDIARerank asks GET /v1/models and takes the one served."""
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    listed = httpx.get(f"{service.base_url}/v1/models", timeout=T).json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["pe-rank"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Default model is set as: pe-rank"
        ranker = NVIDIARerank(base_url=service.base_url)  # a root URL: the client adds /v1
    assert ranker.model == "pe-rank"
    case = CASES[1]
    ranked = ranker.compress_documents(query=case["request"]["query"],
                                       documents=[Document(page_content=t) for t in texts_of(case)])
    assert [texts_of(case).index(d.page_content) for d in ranked] == expected_indices(case)[:5]  # top_n 5


def test_nim_answers_nims_shape_with_usage_and_chunk_headers(service):
    case = CASES[2]
    body = {"model": "anything", "query": {"text": case["request"]["query"]},
            "passages": [{"text": t} for t in texts_of(case)]}
    response = httpx.post(f"{service.base_url}/v1/ranking", json=body, timeout=T)
    answer = response.json()
    assert set(answer) == {"rankings", "usage"}
    assert [r["index"] for r in answer["rankings"]] == expected_indices(case)
    n = len(body["passages"])
    assert [r["logit"] for r in answer["rankings"]] == pytest.approx([1 / (k + 1) for k in range(n)])
    assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 0
    assert response.headers["x-pe-rank-chunks"] == str(len(body["passages"]))
    assert response.headers["x-pe-rank-tokens-cut"] == "0"
    per_model = httpx.post(f"{service.base_url}/v1/retrieval/nvidia/llama-3.2-nv-rerankqa-1b-v2/reranking",
                           json={**body, "top_k": 4}, timeout=T).json()
    assert [r["index"] for r in per_model["rankings"]] == expected_indices(case)[:4]


def test_nim_clients_get_their_own_errors_naming_the_field(service, chunker):
    from langchain_core.documents import Document
    from langchain_nvidia_ai_endpoints import NVIDIARerank

    litellm = _litellm()
    docs = [Document(page_content="fleas"), Document(page_content="dogs")]
    # NVIDIARerank raises a plain Exception: "[status] title", then the body
    with pytest.raises(Exception, match=r"^\[422\] query\.text: must not be empty"):
        NVIDIARerank(base_url=f"{service.base_url}/v1", model="pe-rank").compress_documents(query=" ", documents=docs)
    with pytest.raises(Exception, match=r"^\[422\] passages\[1\]\.text: must not be empty"):
        NVIDIARerank(base_url=f"{service.base_url}/v1", model="pe-rank").compress_documents(
            query="fleas", documents=[Document(page_content="fleas"), Document(page_content="")])
    for model in ("nvidia_nim/pe-rank", "nvidia_nim/ranking/pe-rank"):
        with pytest.raises(litellm.BadRequestError) as err:
            litellm.rerank(model=model, query="fleas", documents=["fleas", ""], api_base=service.base_url,
                           api_key="unused")
        assert err.value.status_code == 422 and json.loads(err.value.message.split(" - ", 1)[1])["field"] \
            == "passages[1].text"
    # truncate NONE (NIM's default): over 512 encoder tokens is refused, as NIM does; END: ranked as chunks
    long = " ".join(texts_of(CASES[-1]))
    assert len(chunker.encode([long])[0].ids) > chunker.chunk_tokens
    with pytest.raises(Exception, match=r"^\[413\] passages\[1\]\.text: is over the 512 limit"):
        NVIDIARerank(base_url=f"{service.base_url}/v1", model="pe-rank").compress_documents(
            query="fleas", documents=[Document(page_content="fleas"), Document(page_content=long)])
    ranked = NVIDIARerank(base_url=f"{service.base_url}/v1", model="pe-rank", truncate="END").compress_documents(
        query="fleas", documents=[Document(page_content="fleas"), Document(page_content=long)])
    assert sorted(d.page_content for d in ranked) == sorted(["fleas", long])
    # a bad shape (truncate outside NIM's two values) names the field too
    response = httpx.post(f"{service.base_url}/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "a"}],
                                                                 "truncate": "START"}, timeout=T)
    assert response.status_code == 422 and response.json()["field"] == "truncate"
    assert response.json()["object"] == "error"
    response = httpx.post(f"{service.base_url}/v1/ranking", json={"query": {"text": "q"},
                                                                 "passages": [{"text": "a", "image": "data:,"}]})
    assert response.status_code == 422 and response.json()["field"] == "passages[0].image"


# ---- /rerank takes vLLM's documents body (and TEI's texts); Infinity's shape on /infinity/rerank


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vllm_and_infinity_clients_rank_like_the_conformance_case(service, case):
    litellm = _litellm()
    query, texts, expected = case["request"]["query"], texts_of(case), expected_indices(case)
    # both providers post the same Cohere-shaped JSON to {api_base}/rerank (return_documents true) and
    # read `document` differently: vLLM's {"text"} object, Infinity's string
    for model, api_base in (("hosted_vllm/pe-rank", service.base_url),
                            ("infinity/pe-rank", f"{service.base_url}/infinity")):
        everything = litellm.rerank(model=model, query=query, documents=texts, api_base=api_base, api_key="unused")
        assert [r["index"] for r in everything.results] == expected, model
        assert [r["document"]["text"] for r in everything.results] == [texts[i] for i in expected], model
        top = litellm.rerank(model=model, query=query, documents=texts, api_base=api_base, api_key="unused",
                             top_n=min(2, len(texts)), return_documents=False)
        assert [r["index"] for r in top.results] == expected[:2] and "document" not in top.results[0], model
    tei = httpx.post(f"{service.base_url}/rerank", json={"query": query, "texts": texts}, timeout=T).json()
    assert [r["index"] for r in tei] == expected  # the same path, told apart by the body


def test_vllm_and_infinity_clients_get_their_own_errors_naming_the_field(service):
    litellm = _litellm()
    for model, api_base in (("hosted_vllm/pe-rank", service.base_url),
                            ("infinity/pe-rank", f"{service.base_url}/infinity")):
        with pytest.raises(litellm.BadRequestError) as err:
            litellm.rerank(model=model, query="fleas", documents=["fleas", " "], api_base=api_base, api_key="unused")
        body = json.loads(err.value.message.split(" - ", 1)[1])
        assert err.value.status_code == 422 and body["field"] == "documents[1]", model
        assert body["error"].startswith("documents[1]:")
    # vLLM's options PE-Rank cannot honour are refused by name, not ignored
    with pytest.raises(litellm.BadRequestError) as err:
        litellm.rerank(model="hosted_vllm/pe-rank", query="fleas", documents=["fleas"], api_base=service.base_url,
                       truncation_side="left")
    assert json.loads(err.value.message.split(" - ", 1)[1])["field"] == "truncation_side"
    for body, field in (({"query": "q"}, "texts"),  # neither shape: TEI's field is named
                        ({"query": "q", "documents": "a"}, "documents"),
                        ({"query": "q", "documents": ["a"], "instruction": "x"}, "instruction"),
                        ({"query": "q", "documents": [{"title": "a"}]}, "documents[0].text")):
        response = httpx.post(f"{service.base_url}/rerank", json=body, timeout=T)
        assert response.status_code == 422 and response.json()["field"] == field, body


# ---- Cohere: max_tokens_per_doc, max_chunks_per_doc, rank_fields


def test_cohere_sdk_with_max_tokens_per_doc(service, chunker):
    import cohere

    co = cohere.ClientV2(api_key="unused", base_url=service.base_url, timeout=T)
    case = CASES[-1]
    query, texts, expected = case["request"]["query"], texts_of(case), expected_indices(case)
    # above every passage's length: nothing is cut, the conformance ranking stands (Cohere's default is 4096)
    whole = co.rerank(model="pe-rank", query=query, documents=texts, max_tokens_per_doc=4096)
    assert [r.index for r in whole.results] == expected
    assert whole.meta.chunks == {"chunks": len(texts), "chunked_documents": 0, "tokens_cut": 0, "cut_documents": 0}
    # below 512: each document is cut at that many tokens, counted and warned about
    cap = 12
    lengths = [len(e.ids) for e in chunker.encode(texts)]
    cut = co.rerank(model="pe-rank", query=query, documents=texts, max_tokens_per_doc=cap)
    assert sorted(r.index for r in cut.results) == list(range(len(texts)))
    assert cut.meta.chunks["cut_documents"] == sum(n > cap for n in lengths) > 0
    # word-aligned cuts may leave a word more out than the bare count says, never fewer
    assert cut.meta.chunks["tokens_cut"] >= sum(max(0, n - cap) for n in lengths)
    assert cut.meta.warnings and "not read" in cut.meta.warnings[0]
    # the same field through pe_rank.v1 gives the same ranking: one path
    v1 = _v1(service, query, texts, max_tokens_per_doc=cap)
    assert [int(r.id) for r in v1.ranks] == [r.index for r in cut.results]
    assert v1.metadata.tokens_cut == cut.meta.chunks["tokens_cut"]
    with pytest.raises(cohere.errors.UnprocessableEntityError) as err:
        co.rerank(model="pe-rank", query=query, documents=texts, max_tokens_per_doc=0)
    assert err.value.body["field"] == "max_tokens_per_doc"


def test_cohere_v1_max_chunks_per_doc_and_rank_fields(service, chunker):
    import cohere

    co = cohere.Client(api_key="unused", base_url=service.base_url, timeout=T)
    case = CASES[-1]
    query, texts = case["request"]["query"], texts_of(case)
    long = " ".join(texts)
    n_tokens = len(chunker.encode([long])[0].ids)
    assert n_tokens > 2 * chunker.chunk_tokens  # three chunks or more
    docs = texts[:4] + [long]
    one = co.rerank(model="pe-rank", query=query, documents=docs, max_chunks_per_doc=1)
    assert one.meta.chunks == {"chunks": 5, "chunked_documents": 0, "tokens_cut": n_tokens - chunker.chunk_tokens,
                               "cut_documents": 1}
    two = co.rerank(model="pe-rank", query=query, documents=docs, max_chunks_per_doc=2)
    assert two.meta.chunks["chunks"] == 6 and two.meta.chunks["chunked_documents"] == 1
    assert 0 < two.meta.chunks["tokens_cut"] <= n_tokens - 2 * chunker.chunk_tokens + 64  # words kept whole
    for answer in (one, two):
        assert sorted(r.index for r in answer.results) == list(range(5))
    with pytest.raises(cohere.errors.UnprocessableEntityError) as err:
        co.rerank(model="pe-rank", query=query, documents=docs, max_chunks_per_doc=101)
    assert err.value.body["field"] == "max_chunks_per_doc"

    # rank_fields: ranked on the named fields joined in order, the documents returned whole
    objects = [{"title": t[:40], "text": t, "id": k} for k, t in enumerate(texts[:8])]
    by_title = co.rerank(model="pe-rank", query=query, documents=objects, rank_fields=["title"],
                         return_documents=True)
    titles = _v1(service, query, [o["title"] for o in objects])
    assert [r.index for r in by_title.results] == [int(r.id) for r in titles.ranks]
    assert by_title.results[0].document.text == objects[by_title.results[0].index]["text"]
    both = httpx.post(f"{service.base_url}/v1/rerank", json={"query": query, "documents": objects,
                                                            "rank_fields": ["title", "text"],
                                                            "return_documents": True}, timeout=T).json()
    joined = _v1(service, query, [f"{o['title']}\n{o['text']}" for o in objects])
    assert [r["index"] for r in both["results"]] == [int(r.id) for r in joined.ranks]
    assert both["results"][0]["document"] == objects[both["results"][0]["index"]]  # title and id kept
    for body, field in (({"documents": objects, "rank_fields": ["title", "body"]}, "documents[0].body"),
                        ({"documents": ["plain", "text"], "rank_fields": ["title"]}, "documents[0]"),
                        ({"documents": objects, "rank_fields": []}, "rank_fields"),
                        ({"documents": [{"text": ["a"]}]}, "documents[0].text")):
        response = httpx.post(f"{service.base_url}/v2/rerank", json={"query": query, **body}, timeout=T)
        assert response.status_code == 422 and response.json()["field"] == field, body


# ---- long documents as chunks, through every door


def test_chunks_of_one_document_in_different_windows(service, chunker, tmp_path, capsys):
    """A document split into three chunks at positions 1-3 of 22: the first window ([2, 22)) sees two of
    them, the second ([0, 12)) the first. The answer must be the chunk-level ranking folded by each
    document's best chunk: the same chunks ranked as plain passages in the same places, then folded."""
    from pe_rank.cli import main

    case = CASES[-1]
    query, texts = case["request"]["query"], texts_of(case)
    long = " ".join(texts[5:12])  # 1,216 encoder tokens: three chunks
    docs = [texts[0], long] + texts[1:19]
    plan = chunker.plan(_request(query, docs))
    assert plan.owner[:5] == (0, 1, 1, 1, 2) and len(plan.owner) == 22
    # the first window, [2, 22), holds chunks 2 and 3 of the document but not chunk 1
    assert window_bounds(22, 20, 10) == [(2, 22), (0, 12)]

    chunked = _v1(service, query, docs)
    m = chunked.metadata
    assert (m.chunks, m.chunked_passages, m.tokens_cut, m.cut_passages, m.windows) == (22, 1, 0, 0, 2)
    assert sorted(r.index for r in chunked.ranks) == list(range(20))  # each document once

    chunk_texts = [p.text for p in plan.ranked.passages]
    as_passages = _v1(service, query, chunk_texts)
    assert as_passages.metadata.chunks == 22 and as_passages.metadata.chunked_passages == 0
    chunk_order = [int(r.id) for r in as_passages.ranks]
    folded, best = [], []
    for k in chunk_order:
        if plan.owner[k] not in folded:
            folded.append(plan.owner[k])
            best.append(k - 1 if plan.owner[k] == 1 else 0)
    assert [r.index for r in chunked.ranks] == folded
    assert [r.chunk for r in chunked.ranks] == best
    # top_n is exact on documents: partial decoding of the chunks it needs
    top = _v1(service, query, docs, top_n=3)
    assert [r.index for r in top.ranks] == folded[:3]

    # Cohere, NIM and TEI (truncate true) give the same order; the in-process CLI too (one ranking path)
    cohere_answer = httpx.post(f"{service.base_url}/v2/rerank", json={"query": query, "documents": docs},
                               timeout=T).json()
    assert [r["index"] for r in cohere_answer["results"]] == folded
    assert cohere_answer["meta"]["chunks"]["chunked_documents"] == 1
    nim = httpx.post(f"{service.base_url}/v1/ranking", json={"query": {"text": query}, "truncate": "END",
                                                            "passages": [{"text": d} for d in docs]}, timeout=T)
    assert [r["index"] for r in nim.json()["rankings"]] == folded and nim.headers["x-pe-rank-chunks"] == "22"
    tei = httpx.post(f"{service.base_url}/rerank", json={"query": query, "texts": docs, "truncate": True}, timeout=T)
    assert [r["index"] for r in tei.json()] == folded and tei.headers["x-pe-rank-chunked-documents"] == "1"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"query": query,
                                   "passages": [{"id": str(i), "text": d} for i, d in enumerate(docs)]}))
    capsys.readouterr()
    assert main(["rerank", "--model", str(CONFORMANCE / "tiny-a"), "--input", str(request), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in out["ranking"]] == folded and out["metadata"]["chunks"] == 22


def test_the_chunk_limits_are_in_model_info_and_enforced(service):
    info = service.client.model_info(timeout=T)
    assert (info.default_max_chunks_per_doc, info.max_chunks, info.chunk_tokens) == (10, MAX_CHUNKS, 510)
    dashes = "-" * 52_000  # one token a character, no whitespace: 100 chunks at max_chunks_per_doc 100
    docs = [dashes] * 11  # 1,100 chunks
    response = httpx.post(f"{service.base_url}/v2/rerank", json={"query": "q", "documents": docs,
                                                                "max_chunks_per_doc": 100}, timeout=T)
    assert response.status_code == 413 and response.json()["field"] == "documents"
    assert f"more than {MAX_CHUNKS} chunks" in response.json()["error"]
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        _v1(service, "q", docs, max_chunks_per_doc=100)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("passages:")


def _request(query: str, texts: list[str]):
    from pe_rank.core.types import Passage, RerankRequest

    return RerankRequest(query=query, passages=tuple(Passage(id=str(i), text=t) for i, t in enumerate(texts)))
