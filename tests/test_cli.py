"""`pe-rank make-model tiny` and `pe-rank rerank --model` end to end, as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pe_rank", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    proc = run("make-model", "tiny", "--out", str(out), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    return out


def write_request(path, dl19, n=25, **extra):
    q = dl19[0]
    body = {"query": q["query"], "passages": [{"id": h["docid"], "text": h["content"]} for h in q["hits"][:n]], **extra}
    path.write_text(json.dumps(body))
    return path


def test_rerank_json_output(cli_model, dl19, tmp_path):
    req = write_request(tmp_path / "req.json", dl19)
    out = tmp_path / "out.json"
    proc = run("rerank", "--model", str(cli_model), "--input", str(req), "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert sorted(r["index"] for r in printed["ranking"]) == list(range(25))
    assert printed["ranking"][0]["score"] == 1.0
    ids = [h["docid"] for h in dl19[0]["hits"][:25]]
    assert all(ids[r["index"]] == r["id"] for r in printed["ranking"])
    meta = printed["metadata"]
    assert meta["windows"] == 2 and meta["decode_steps"] == 18 + 13 and meta["prompt_tokens"] > 0
    assert meta["encode_ms"] >= 0 and meta["rank_ms"] > 0


def test_rerank_top_n_and_table(cli_model, dl19, tmp_path):
    req = write_request(tmp_path / "req.json", dl19, top_n=5, mode="first")
    proc = run("rerank", "--model", str(cli_model), "--input", str(req))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "index"]
    assert len(lines) == 1 + 5 + 1 and "decode_steps=0" in lines[-1]


@pytest.mark.parametrize("body,needle", [
    ({"query": "", "passages": [{"id": "a", "text": "x"}]}, "query: must not be empty"),
    ({"query": "q", "passages": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, "duplicate id"),
    ({"query": "q", "passages": [{"id": "a", "text": "x"}], "mode": "fast"}, "mode: must be"),
    ({"query": "q", "passages": [{"id": "a", "text": "x"}], "window_size": "20"}, "window_size: must be int"),
])
def test_rerank_bad_requests(cli_model, tmp_path, body, needle):
    req = tmp_path / "req.json"
    req.write_text(json.dumps(body))
    proc = run("rerank", "--model", str(cli_model), "--input", str(req))
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_the_example_request_shows_its_text_as_written(cli_model, tmp_path):
    """examples/dl19_request.json holds clean UTF-8 (MS MARCO's own texts carry mojibake such as "Â¼" for "¼";
    the example's were repaired), read as UTF-8 whatever the locale, and the table shows it as is."""
    import os
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "dl19_request.json"
    body = json.loads(example.read_text(encoding="utf-8"))
    texts = [p["text"] for p in body["passages"]]
    assert not [t for t in texts if "Â" in t or "â\x80" in t], "mojibake in the example"
    assert any("¼-inch" in t for t in texts)
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "rerank", "--model", str(cli_model), "--input",
                           str(example)], capture_output=True, timeout=300,
                          env={**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    table = proc.stdout.decode("utf-8")
    assert "Â" not in table and len(table.strip().splitlines()) == 1 + (body.get("top_n") or len(texts)) + 1
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"query": "caf\xe9", "passages": [{"id": "a", "text": "x"}]}'.encode("latin-1"))
    refused = run("rerank", "--model", str(cli_model), "--input", str(latin1))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "utf-8" in refused.stderr
