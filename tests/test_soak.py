"""`pe-rank soak` at a small size: a real `pe-rank serve` with its embedded Triton on the tiny
repository, valid / invalid / cancelled / deadline-bound calls from several clients, Triton
SIGKILLed in the middle. Every call answered once with an allowed code, rankings identical to a
single client's, nothing left behind. Plus the request mix and the verdicts, checked alone."""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import time

import pytest

from conftest import CONFORMANCE, DATA
from pe_rank.tools.soak_mix import (DEFAULT_MIX, INVALID, KINDS, LOST, Outcome, invalid_requests, load_samples, make_plan,
                          parse_mix, valid_pool, verdict)


def test_the_plan_is_seeded_with_exact_quotas_and_every_invalid_variant():
    plan = make_plan(200, seed=3, pool_size=6)
    assert plan == make_plan(200, seed=3, pool_size=6)
    assert plan != make_plan(200, seed=4, pool_size=6)
    counts = collections.Counter(s.kind for s in plan)
    assert counts == {k: round(DEFAULT_MIX[k] * 200) for k in KINDS}
    assert [s.index for s in plan] == list(range(200))
    assert {s.variant for s in plan if s.kind == "invalid"} == set(range(len(INVALID)))
    assert {s.variant for s in plan if s.kind != "invalid"} <= set(range(6))
    assert all(0.0 <= s.frac <= 1.5 for s in plan if s.kind == "cancelled")
    assert all(0.1 <= s.frac <= 2.0 for s in plan if s.kind == "deadline")
    odd = make_plan(7, seed=0, pool_size=2, mix=parse_mix("valid=1,invalid=1,cancelled=1,deadline=1"))
    assert len(odd) == 7 and set(collections.Counter(s.kind for s in odd).values()) <= {1, 2}


def test_each_invalid_variant_is_refused_by_the_servers_validation_naming_its_field():
    """The soak's expectation is the server's own validation, run here on the real checkpoint."""
    from pe_rank.runtime.inprocess import load_in_process
    from pe_rank.core.validation import InvalidRequest, validate_request
    from pe_rank.core.proto import request_from_proto

    model, reranker = load_in_process(CONFORMANCE / "tiny-b")
    samples = load_samples(DATA / "bm25_dl19.json.gz")
    pool = valid_pool(samples, 10, seed=0, max_passages=20, embedding_size=model.embedding_size)
    assert len({m.SerializeToString(deterministic=True) for m in pool}) == 10
    assert {len(m.passages) for m in pool} >= {2, 20}
    assert any(m.passages[0].embedding for m in pool) and any(m.passages[0].text for m in pool)

    def check(msg) -> None:
        validate_request(request_from_proto(msg), model.embedding_size, prompts=reranker.prompts)

    for msg in pool:
        check(msg)  # valid
    for msg, field in invalid_requests(pool[0], model.embedding_size):
        with pytest.raises(InvalidRequest) as err:
            check(msg)
        assert err.value.field == field


def _out(code: str, ranking=None) -> Outcome:
    return Outcome(0, "x", code, 0.0, 0.0, ranking=ranking, details="query: must not be empty")


@pytest.mark.parametrize("kind, code, ranking, field, expected", [
    ("valid", "OK", (("a", 0), ("b", 1)), None, "correct"),
    ("valid", "OK", (("b", 1), ("a", 0)), None, "wrong_ranking"),
    ("valid", "UNAVAILABLE", None, None, "refused"),
    ("valid", "RESOURCE_EXHAUSTED", None, None, "refused"),
    ("valid", "DEADLINE_EXCEEDED", None, None, "wrong_code"),  # it had no deadline
    ("valid", "CANCELLED", None, None, "wrong_code"),          # nobody cancelled it
    ("valid", "INTERNAL", None, None, "wrong_code"),
    ("valid", LOST, None, None, "lost"),
    ("invalid", "INVALID_ARGUMENT", None, "query", "refused"),
    ("invalid", "INVALID_ARGUMENT", None, "passages[1].id", "wrong_field"),
    ("invalid", "RESOURCE_EXHAUSTED", None, "query", "wrong_code"),  # validation comes before admission
    ("invalid", "UNAVAILABLE", None, "query", "wrong_code"),   # validation comes before Triton
    ("invalid", "OK", (("a", 0),), "query", "wrong_code"),
    ("cancelled", "CANCELLED", None, None, "refused"),
    ("cancelled", "OK", (("a", 0), ("b", 1)), None, "correct"),  # answered before the cancel
    ("cancelled", "DEADLINE_EXCEEDED", None, None, "wrong_code"),
    ("deadline", "DEADLINE_EXCEEDED", None, None, "refused"),
    ("deadline", "OK", (("b", 1), ("a", 0)), None, "wrong_ranking"),
    ("deadline", "UNKNOWN", None, None, "wrong_code"),
])
def test_verdicts(kind, code, ranking, field, expected):
    reference = None if kind == "invalid" else (("a", 0), ("b", 1))
    assert verdict(kind, _out(code, ranking), reference, field) == expected


@pytest.mark.triton
def test_soak_with_a_triton_kill_loses_nothing_and_leaves_nothing(exported, tmp_path):
    repo = exported("tiny-b")
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "pe_rank", "soak", "--repository", str(repo), "--requests", "40", "--clients", "5",
           "--data", str(DATA / "bm25_dl19.json.gz"), "--seed", "1", "--json", str(out),
           "--markdown", str(tmp_path / "soak.md"), "--server-log", str(tmp_path / "server.log"),
           "--settle", "1", "--serve-arg=--triton-backoff=0.2", "--serve-arg=--max-concurrent=3"]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(proc.stdout, f"\nsoak took {time.monotonic() - started:.0f} s")
    assert out.exists(), proc.stdout + proc.stderr
    fig = json.loads(out.read_text())
    assert proc.returncode == 0, (fig["failures"], proc.stdout[-3000:], proc.stderr[-3000:])
    assert fig["sent"] == fig["answered_once"] == 40
    assert fig["lost"] == 0 and fig["wrong_code"] == {} and fig["duplicate_request_ids"] == 0
    ok_calls = [c for c in fig["calls"] if c[2] == "OK" and c[1] != "invalid"]
    assert fig["correct_rankings"] == fig["ok"] == len(ok_calls) > 0 and fig["wrong_rankings"] == 0
    refused = sum(fig["refused_by_code"].values())
    assert fig["ok"] + refused == 40
    # every kind was sent, and the invalid ones were refused as invalid
    assert set(fig["by_kind"]) == set(KINDS) and all(fig["by_kind"][k] for k in KINDS)
    assert fig["by_kind"]["invalid"].get("INVALID_ARGUMENT", 0) > 0
    assert fig["triton_kills"] == 1 and fig["triton_restarted"] and len(fig["tritonserver_pids"]) == 2
    assert "UNAVAILABLE" in fig["refused_by_code"]  # the kill was felt
    assert fig["final_request"]["correct"]
    assert fig["server_exit_code"] == 0
    # leaks were looked for where they would be: the processes and shm regions were seen
    assert fig["processes_seen"] >= 4 and fig["shm_regions_seen"] >= 2
    assert fig["leaked_processes"] == 0 and fig["leaked_shm"] == 0
    assert fig["rss_before_mb"] > 0 and fig["rss_after_mb"] > 0
    assert (tmp_path / "soak.md").read_text().count("PASS") == 1
