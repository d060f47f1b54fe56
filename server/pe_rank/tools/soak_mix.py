"""The soak's request mix and its verdicts (pure functions, no server): which calls to send, the
valid requests (DL19 queries and passages) and invalid variants of them, and what each answer means."""
from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KINDS = ("valid", "invalid", "cancelled", "deadline")
DEFAULT_MIX = {"valid": 0.5, "invalid": 0.2, "cancelled": 0.15, "deadline": 0.15}
# what each kind may get besides its expected answer (OK with the reference ranking, or the code below)
EXPECTED_CODE = {"invalid": "INVALID_ARGUMENT", "cancelled": "CANCELLED", "deadline": "DEADLINE_EXCEEDED"}
ALLOWED_REFUSALS = {
    "valid": {"RESOURCE_EXHAUSTED", "UNAVAILABLE"},
    "invalid": set(),  # validation runs before admission and before Triton: INVALID_ARGUMENT only
    "cancelled": {"RESOURCE_EXHAUSTED", "UNAVAILABLE"},
    "deadline": {"RESOURCE_EXHAUSTED", "UNAVAILABLE"},
}
LOST = "LOST"


class SoakError(RuntimeError):
    """The soak could not run (bad arguments, the server did not start, a reference failed): exit 2."""


# ---- the request mix: a pure function of (requests, seed, mix), so it is the same on every run

@dataclass(frozen=True)
class Spec:
    """One planned call. ``variant``: a valid-pool index, or an INVALID index for kind invalid.
    ``frac``: cancel delay (cancelled) or deadline (deadline) as a multiple of the reference latency."""
    index: int
    kind: str
    variant: int
    frac: float = 0.0


def parse_mix(text: str) -> dict[str, float]:
    """``valid=0.5,invalid=0.2,cancelled=0.15,deadline=0.15`` (weights, normalised)."""
    mix = {k: 0.0 for k in KINDS}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in mix:
            raise SoakError(f"--mix: unknown kind {name!r} (kinds: {', '.join(KINDS)})")
        try:
            mix[name] = float(value)
        except ValueError:
            raise SoakError(f"--mix: {part!r} is not KIND=WEIGHT") from None
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise SoakError("--mix: weights must be >= 0 and not all 0")
    return {k: v / total for k, v in mix.items()}


def make_plan(requests: int, seed: int, pool_size: int, mix: dict[str, float] = DEFAULT_MIX,
              invalid_variants: int | None = None) -> list[Spec]:
    """Exact per-kind quotas (largest remainder), shuffled; invalid requests cycle through every variant."""
    rng = random.Random(seed)
    n_invalid = len(INVALID) if invalid_variants is None else invalid_variants
    raw = {k: mix.get(k, 0.0) * requests for k in KINDS}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(KINDS, key=lambda k: raw[k] - counts[k], reverse=True)[:requests - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(kinds)
    specs, invalid_seen = [], 0
    for i, kind in enumerate(kinds):
        if kind == "invalid":
            specs.append(Spec(i, kind, invalid_seen % n_invalid))
            invalid_seen += 1
        elif kind == "cancelled":
            specs.append(Spec(i, kind, rng.randrange(pool_size), round(rng.uniform(0.0, 1.5), 3)))
        elif kind == "deadline":
            specs.append(Spec(i, kind, rng.randrange(pool_size), round(rng.uniform(0.1, 2.0), 3)))
        else:
            specs.append(Spec(i, kind, rng.randrange(pool_size)))
    return specs


# ---- requests: a valid pool from DL19 and invalid variants of it

def load_samples(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """(query, [(id, text)]) from a request JSON (examples/dl19_request.json) or RankLLM JSON(.gz)."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, EOFError) as exc:
        raise SoakError(f"--data {path}: {exc}") from None
    items = [data] if isinstance(data, dict) else data
    samples = []
    for item in items:
        if "passages" in item:
            passages = [(str(p["id"]), p["text"]) for p in item["passages"]]
        else:
            passages = [(str(h["docid"]), h["content"]) for h in item.get("hits", [])]
        unique = list(dict((pid, (pid, text)) for pid, text in reversed(passages)).values())[::-1]
        if item.get("query") and len(unique) >= 2:
            samples.append((item["query"], unique))
    if not samples:
        raise SoakError(f"--data {path}: no query with at least 2 passages")
    return samples


def valid_pool(samples: list[tuple[str, list[tuple[str, str]]]], distinct: int, seed: int, max_passages: int,
               embedding_size: int):
    """``distinct`` different valid requests: passage counts 2..max_passages, windows, top_n, modes,
    and one in five with precomputed (random, seeded) embeddings instead of texts."""
    from ..v1 import ranker_pb2 as pb

    rng = random.Random(seed + 1)
    pool, keys = [], set()
    for attempt in range(50 * distinct):
        j = len(pool)
        if j == distinct:
            break
        spread = attempt == j  # no collision yet: passage counts spread evenly over 2..max
        query, passages = samples[j % len(samples)] if spread else rng.choice(samples)
        top = min(max_passages, len(passages))
        n = 2 + round((top - 2) * j / max(1, distinct - 1)) if spread else rng.randint(2, top)
        start = rng.randint(0, len(passages) - n)
        msg = pb.RerankRequest(query=query)
        window = rng.choice([None, None, 10, 8])
        if window is not None:
            msg.window_size, msg.stride = window, window // 2
        if rng.random() < 0.3:
            msg.top_n = rng.randint(1, n)
        if rng.random() < 0.15:
            msg.mode = pb.MODE_FIRST
        with_embeddings = len(pool) % 5 == 4
        for pid, text in passages[start:start + n]:
            item = msg.passages.add(id=pid)
            if with_embeddings:
                v = [rng.gauss(0.0, 1.0) for _ in range(embedding_size)]
                norm = math.sqrt(sum(x * x for x in v)) or 1.0
                item.embedding.extend(x / norm for x in v)
            else:
                item.text = text
        key = msg.SerializeToString(deterministic=True)
        if key not in keys:
            keys.add(key)
            pool.append(msg)
    if len(pool) < distinct:
        raise SoakError(f"--distinct {distinct}: only {len(pool)} distinct requests can be made from --data")
    return pool


def _copy(base):
    out = type(base)()
    out.CopyFrom(base)
    return out


def _empty_query(base, size):
    m = _copy(base); m.query = ""
    return m, "query"


def _blank_query(base, size):
    m = _copy(base); m.query = "   "
    return m, "query"


def _placeholder_query(base, size):
    m = _copy(base); m.query = base.query + " <PLACEHOLDER>"
    return m, "query"


def _no_passages(base, size):
    m = _copy(base); del m.passages[:]
    return m, "passages"


def _duplicate_id(base, size):
    m = _copy(base); m.passages[1].id = m.passages[0].id
    return m, "passages[1].id"


def _empty_text(base, size):
    m = _copy(base); m.passages[1].text = ""; del m.passages[1].embedding[:]
    return m, "passages[1].text"


def _wrong_embedding_size(base, size):
    m = _copy(base); del m.passages[0].embedding[:]; m.passages[0].embedding.extend([0.1] * (size + 1))
    return m, "passages[0].embedding"


def _nan_embedding(base, size):
    m = _copy(base); del m.passages[0].embedding[:]; m.passages[0].embedding.extend([float("nan")] * size)
    return m, "passages[0].embedding"


def _window_one(base, size):
    m = _copy(base); m.window_size = 1; m.stride = 1
    return m, "window_size"


def _stride_is_window(base, size):
    m = _copy(base); m.window_size = 4; m.stride = 4
    return m, "stride"


def _negative_top_n(base, size):
    m = _copy(base); m.top_n = -1
    return m, "top_n"


def _unknown_mode(base, size):
    m = _copy(base); m.mode = 7
    return m, "mode"


INVALID: tuple[Callable, ...] = (_empty_query, _blank_query, _placeholder_query, _no_passages, _duplicate_id,
                                 _empty_text, _wrong_embedding_size, _nan_embedding, _window_one, _stride_is_window,
                                 _negative_top_n, _unknown_mode)


def invalid_requests(base, embedding_size: int) -> list[tuple[object, str]]:
    """(request, the field INVALID_ARGUMENT must name) for each INVALID variant of a text request."""
    return [make(base, embedding_size) for make in INVALID]


# ---- outcomes and their verdicts

@dataclass
class Outcome:
    index: int
    kind: str
    code: str                      # "OK", a grpc.StatusCode name, or LOST
    sent_s: float                  # since the load started
    latency_s: float
    ranking: tuple | None = None   # ((id, index), ...) of an OK answer
    request_id: str = ""
    details: str = ""


def field_of(details: str) -> str:
    """The field an INVALID_ARGUMENT names: the text before the first ': '."""
    return details.split(": ", 1)[0].strip() if ": " in details else ""


def verdict(kind: str, outcome: Outcome, reference: tuple | None, expected_field: str | None = None) -> str:
    """correct | wrong_ranking | refused | wrong_code | wrong_field | lost."""
    if outcome.code == LOST:
        return "lost"
    if outcome.code == "OK":
        if kind == "invalid" or reference is None:
            return "wrong_code"
        return "correct" if outcome.ranking == reference else "wrong_ranking"
    if outcome.code == EXPECTED_CODE.get(kind) or outcome.code in ALLOWED_REFUSALS[kind]:
        if outcome.code == "INVALID_ARGUMENT" and expected_field and field_of(outcome.details) != expected_field:
            return "wrong_field"
        return "refused"
    return "wrong_code"


def describe(msg) -> dict:
    """A valid request in a few words, for the figures."""
    return {"passages": len(msg.passages),
            "window_size": msg.window_size if msg.HasField("window_size") else None,
            "stride": msg.stride if msg.HasField("stride") else None,
            "top_n": msg.top_n if msg.HasField("top_n") else None, "mode": "first" if msg.mode == 2 else "full",
            "embeddings": bool(msg.passages and msg.passages[0].embedding)}


def ranking_of(response) -> tuple:
    return tuple((r.id, r.index) for r in response.ranks)


