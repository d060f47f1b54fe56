"""Long passages as chunks (core/chunking.py), checked with real encoder tokenizers and real texts:
every chunk fits the encoder once tokenized again, chunks cover the passage in order and end between
words, the caps cut what they say and count it, passages that fit are left exactly as sent (every
conformance request is ranked as it was), and folding a chunk ranking gives each passage once, at its
best chunk, with an exact top-n."""
from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import CHECKPOINTS, CONFORMANCE, DATA, conformance_cases
from pe_rank.core.chunking import ChunkPlan, Chunker
from pe_rank.core.errors import InvalidRequest, RequestTooLarge
from pe_rank.core.jsonio import parse_request
from pe_rank.core.types import ChunkStats, Passage, RerankRequest
from pe_rank.core.validation import validate_request

ASSETS = Path(__file__).resolve().parents[1] / "server" / "pe_rank" / "models" / "assets"
BERT = ASSETS / "bert-uncased" / "tokenizer.json"  # BERT's uncased WordPiece vocabulary, as all-MiniLM-L6-v2's


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker.from_file(BERT)


@pytest.fixture(scope="module")
def tokens():
    """An independent tokenizer: how many text tokens the encoder sees in a text."""
    tok = Tokenizer.from_file(str(BERT))
    tok.no_truncation()
    tok.no_padding()
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def passages() -> list[str]:
    with gzip.open(DATA / "bm25_dl19.json.gz", "rt") as f:
        return [h["content"] for q in json.load(f) for h in q["hits"]]


def document(passages: list[str], tokens, at_least: int) -> str:
    """Real passages joined into one text of at least ``at_least`` encoder tokens (paragraphs apart)."""
    out, n = [], 0
    for p in passages:
        out.append(p)
        n += tokens(p)
        if n >= at_least:
            return "\n\n".join(out)
    raise AssertionError("not enough text")


def request(*texts: str, **fields) -> RerankRequest:
    return RerankRequest(query="q", passages=tuple(Passage(id=str(i), text=t) for i, t in enumerate(texts)), **fields)


def located(text: str, chunks: list[str]) -> list[tuple[int, int]]:
    """Where each chunk sits in the text, searched in order: chunks are slices of it."""
    spans, at = [], 0
    for chunk in chunks:
        start = text.index(chunk, at)
        spans.append((start, start + len(chunk)))
        at = start + len(chunk)
    return spans


def test_the_encoder_reads_512_tokens_with_its_specials(chunker):
    assert chunker.chunk_tokens == 510  # [CLS] and [SEP]


@pytest.mark.parametrize("size", [511, 600, 1500, 4500])
def test_a_long_passage_becomes_chunks_that_fit_cover_it_and_end_between_words(chunker, tokens, passages, size):
    text = document(passages, tokens, size)
    total = tokens(text)
    plan = chunker.plan(request("short", text, "also short"))
    chunks = [p.text for p, owner in zip(plan.ranked.passages, plan.owner) if owner == 1]
    n = math.ceil(total / chunker.chunk_tokens)
    assert len(chunks) == n and plan.owner == (0,) + (1,) * n + (2,)
    assert plan.stats == ChunkStats(chunks=n + 2, chunked_passages=1, tokens_cut=0, cut_passages=0)
    counts = [tokens(c) for c in chunks]
    assert max(counts) <= chunker.chunk_tokens  # each fits the encoder, tokenized on its own
    assert sum(counts) == total  # nothing lost or doubled: no overlap
    assert max(counts) - min(counts) <= 64  # balanced, up to the room for ending between words
    spans = located(text, chunks)
    assert "".join(text.split()) == "".join("".join(chunks).split())  # in order, the whole text
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end < start and text[end:start].isspace()  # a boundary is whitespace: no word is split
    assert [p.id for p in plan.ranked.passages] == ["0"] + [f"1#{k}" for k in range(n)] + ["2"]
    assert plan.ranked.passages[0] is plan.request.passages[0]  # passages that fit are untouched


def test_a_word_longer_than_the_backoff_is_split_and_still_fits(chunker, tokens):
    text = "-".join(["ab"] * 1200)  # no whitespace at all: ~2,400 tokens
    plan = chunker.plan(request(text))
    chunks = [p.text for p in plan.ranked.passages]
    assert len(chunks) == math.ceil(tokens(text) / chunker.chunk_tokens)
    assert all(tokens(c) <= chunker.chunk_tokens for c in chunks) and "".join(chunks) == text


def test_max_chunks_per_doc_reads_a_prefix_and_counts_the_rest(chunker, tokens, passages):
    text = document(passages, tokens, 5000)
    total = tokens(text)
    plan = chunker.plan(request(text, max_chunks_per_doc=3))
    chunks = [p.text for p in plan.ranked.passages]
    read = sum(tokens(c) for c in chunks)
    assert len(chunks) == 3 and 3 * chunker.chunk_tokens - 64 <= read <= 3 * chunker.chunk_tokens
    assert plan.stats == ChunkStats(chunks=3, chunked_passages=1, tokens_cut=total - read, cut_passages=1)
    assert text.startswith(chunks[0]) and located(text, chunks)  # the beginning, in order


def test_the_server_default_caps_chunks_at_ten(chunker, tokens, passages):
    text = document(passages, tokens, 11 * 510)
    plan = chunker.plan(request(text))
    assert plan.stats.chunks == 10 and plan.stats.cut_passages == 1
    assert chunker.plan(request(text), default_max_chunks=2).stats.chunks == 2


def test_one_chunk_is_the_references_truncation(chunker, tokens, passages):
    """max_chunks_per_doc 1 (and max_tokens_per_doc up to 512) leaves the text as sent: the encoder cuts
    it at 512 tokens itself, as the reference did; what it does not read is counted."""
    text = document(passages, tokens, 900)
    for fields in ({"max_chunks_per_doc": 1}, {"max_tokens_per_doc": 512}, {"max_tokens_per_doc": 511}):
        plan = chunker.plan(request(text, **fields))
        assert plan.ranked.passages[0].text is text, fields
        assert plan.stats == ChunkStats(chunks=1, chunked_passages=0, tokens_cut=tokens(text) - 510, cut_passages=1)


@pytest.mark.parametrize("cap", [1, 100, 509, 513, 1000, 3000])
def test_max_tokens_per_doc_cuts_there(chunker, tokens, passages, cap):
    text = document(passages, tokens, 4000)
    total = tokens(text)
    plan = chunker.plan(request(text, "fits", max_tokens_per_doc=cap))
    chunks = [p.text for p, owner in zip(plan.ranked.passages, plan.owner) if owner == 0]
    read = sum(tokens(c) for c in chunks)
    budget = min(cap, 510) if cap <= 512 else cap
    assert len(chunks) == math.ceil(budget / 510)
    assert budget - 64 <= read <= budget and all(tokens(c) <= 510 for c in chunks)
    assert plan.stats.tokens_cut == total - read and plan.stats.cut_passages == 1
    if cap >= 100:  # one token cannot end between words
        assert text[located(text, chunks)[-1][1]].isspace()  # the cut falls between words
    short = plan.ranked.passages[-1]
    assert short.text == "fits" and plan.owner[-1] == 1  # under the cap: as sent


def test_every_conformance_request_is_ranked_as_sent():
    """No conformance passage reaches the encoder's limit: the plan is the request itself, so the exact
    mode's rankings are those of the unchunked path, bit for bit (the server and Triton tests check them)."""
    from transformers import AutoTokenizer

    chunkers = {name: Chunker(AutoTokenizer.from_pretrained(str(CONFORMANCE / name / "encoder")).backend_tokenizer)
                for name in CHECKPOINTS}
    for name, _, case in conformance_cases():
        req = parse_request(case["request"])
        plan = chunkers[name].plan(req)
        assert plan.ranked is req and not plan.split
        assert plan.owner == tuple(range(len(req.passages))) and plan.stats.tokens_cut == 0
        assert plan.chunk_top_n() == req.top_n


def test_precomputed_embeddings_are_not_chunked(chunker, tokens, passages):
    text = document(passages, tokens, 1200)
    req = RerankRequest(query="q", passages=(Passage(id="e", embedding=np.ones(384, np.float32)),
                                             Passage(id="t", text=text)))
    plan = chunker.plan(req)
    assert plan.owner == (0, 1, 1, 1) and plan.ranked.passages[0] is req.passages[0]


def test_too_many_chunks_is_refused_naming_the_passages(chunker, tokens, passages):
    text = document(passages, tokens, 2000)
    with pytest.raises(RequestTooLarge) as err:
        chunker.plan(request(text, text, text), max_chunks=10)
    assert err.value.field == "passages" and "max_chunks_per_doc" in err.value.reason


@pytest.mark.parametrize("fields, field", [({"max_chunks_per_doc": 0}, "max_chunks_per_doc"),
                                           ({"max_chunks_per_doc": 101}, "max_chunks_per_doc"),
                                           ({"max_tokens_per_doc": 0}, "max_tokens_per_doc")])
def test_chunk_fields_out_of_range_name_the_field(fields, field):
    with pytest.raises(InvalidRequest) as err:
        validate_request(request("a", **fields), 32)
    assert err.value.field == field


def test_the_cli_json_takes_the_chunk_fields():
    req = parse_request({"query": "q", "passages": [{"text": "a"}], "max_chunks_per_doc": 3, "max_tokens_per_doc": 99})
    assert (req.max_chunks_per_doc, req.max_tokens_per_doc) == (3, 99)
    with pytest.raises(InvalidRequest) as err:
        parse_request({"query": "q", "passages": [{"text": "a"}], "max_chunks_per_doc": "3"})
    assert err.value.field == "max_chunks_per_doc"


def test_fold_gives_each_passage_once_at_its_best_chunk_and_an_exact_top_n():
    rng = random.Random(5)
    for _ in range(300):
        sizes = [rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(rng.randint(1, 30))]
        owner = tuple(i for i, size in enumerate(sizes) for _ in range(size))
        top_n = rng.randint(1, len(sizes))
        req = request(*["x"] * len(sizes), top_n=top_n)
        ranked = request(*["y"] * len(owner))
        plan = ChunkPlan(req, ranked, owner, ChunkStats(chunks=len(owner)))
        order = list(range(len(owner)))
        rng.shuffle(order)
        passages, best = plan.fold(order)
        assert sorted(passages) == list(range(len(sizes)))
        for p, chunk in zip(passages, best):
            first = owner.index(p)
            mine = [k for k in order if owner[k] == p]
            assert chunk == mine[0] - first  # the best chunk, numbered within its passage
        assert passages == sorted(range(len(sizes)), key=lambda p: min(order.index(k) for k in range(len(owner))
                                                                         if owner[k] == p))
        m = plan.chunk_top_n()
        # decoding only the first m chunks exactly decides the top-n passages
        assert plan.fold(order[:m])[0][:top_n] == passages[:top_n]
        assert m == min(len(owner), sum(sorted(sizes, reverse=True)[:top_n]))
