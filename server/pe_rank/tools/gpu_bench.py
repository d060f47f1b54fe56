"""``pe-rank bench --synthetic SHAPE``: what PE-Rank costs on a device, with no model files.

Made for a bare GPU machine lent for minutes (PyTorch, transformers and numpy only): the model
is synthetic (:mod:`pe_rank.tools.synthetic`: released shapes, random weights made on the device),
the data are the DL19 BM25 candidates and the conformance vectors of a source checkout. It
measures, printing progress per phase:

* whole queries at top-20 and top-100 in the modes full, top-10 partial and first, through the
  in-process reranker (encoder, projector, prompt-head cache, sliding windows): total, encode,
  prefill, decode, decode steps;
* decode steps: the reference ``step`` at batch 1 and the engine's pool step at batch 1..64 (ms and ATen
  operator calls per step), next to the
  weight-read floor of the device (bytes of weights per step / memory bandwidth);
* fidelity on the device: the conformance cases ranked in float32 (TF32 off), and in the bench
  dtype how many still agree and the largest score difference along the float32 decoding path;
* peak device memory, device name, torch / CUDA / transformers versions.

Every figure is a median over repeats after a warm-up, with ``torch.cuda.synchronize()`` on
both sides of each timed region. Nothing here imports grpc, Triton, prometheus, matplotlib,
peft or gguf (tests/test_gpu_bench.py runs it with them unimportable).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.errors import UserError
from .recorded_prompts import CONFORMANCE_CHECKPOINTS, DEFAULT_CONFORMANCE
from .recorded_prompts import FILE as RECORDED
from .recorded_prompts import load as load_recorded
from .results import git_commit, machine_info, result_stem

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DATA = REPO_ROOT / "tests" / "data" / "bm25_dl19.json.gz"
PAPER_TOP100_S = 3.62  # PE-Rank, Mistral-7B, DL19 BM25 top-100, per query (the paper's table)
PAPER_TOP20_S = 0.5    # "about 0.5 s" for top-20 in the paper
WINDOW = 20
TOP_KS = (20, 100)
MODES: dict[str, dict[str, Any]] = {"full": {}, "top10": {"top_n": 10}, "first": {"mode": "first"}}
MIN_TRANSFORMERS = (5, 24)  # pyproject's pin; core/ uses transformers 5's cache API

# Peak memory bandwidth in GB/s (1e9 bytes/s, vendor data sheets), matched as substrings of
# torch.cuda.get_device_name() in this order (GH200 before H200, A100 before A10, L40 before L4).
BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3938), ("H100 PCIe", 2000), ("H100", 3350), ("H800", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100-PCIE-80GB", 1935), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600),
    ("RTX 4090", 1008), ("V100", 900), ("T4", 320),
)


def log(message: str, start: float) -> None:
    print(f"[bench --synthetic {time.monotonic() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


def known_bandwidth(device_name: str) -> float | None:
    for key, gbs in BANDWIDTH_GBS:
        if key.lower() in device_name.lower():
            return gbs
    return None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class Clock:
    """Wall time of a region, with the device drained on both sides (CUDA kernels are async)."""

    def __init__(self, device) -> None:
        import torch

        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def sync(self) -> None:
        self._sync()

    def ms(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        return (time.perf_counter() - t0) * 1e3, out


class Memory:
    """Peak device memory per phase (CUDA), or the process's peak RSS (CPU)."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) / 1e9
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB

    def allocated_gb(self) -> float | None:
        return self.torch.cuda.memory_allocated(self.device) / 1e9 if self.cuda else None


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products without TF32 (what the conformance rankings need), restored after."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; the legacy flags must not be mixed in
        saved = (matmul.fp32_precision, cudnn.fp32_precision)
        matmul.fp32_precision = cudnn.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, cudnn.fp32_precision = saved
    else:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, cudnn.allow_tf32 = saved


# ---- fidelity on the device


class _RecordingBackend:
    """A window backend that decodes each window alone (start, then a step per pick, with the
    ranker's own WindowDecoder) and keeps its prompt ids, picks and score vectors for the replay."""

    def __init__(self, stepper, windows: list[dict]) -> None:
        self.stepper = stepper
        self.windows = windows

    async def rank_window(self, job):
        from ..core.ranker import WindowDecoder, WindowOutcome

        decoder = WindowDecoder(len(job.embeds), job.mode, job.emit)
        state, scores = self.stepper.start(job.prompt_ids, job.embeds)
        record = {"prompt_ids": np.array(job.prompt_ids), "picks": [], "scores": [np.array(scores)]}
        self.windows.append(record)
        while (pick := decoder.feed(scores)) is not None:
            scores = self.stepper.step(state, pick)
            record["picks"].append(pick)
            record["scores"].append(np.array(scores))
        return WindowOutcome(order=decoder.order, prompt_tokens=len(job.prompt_ids),
                             cached_tokens=state.cached_tokens, decode_steps=decoder.decode_steps)


class _RecordingSource:
    """A WindowSource that remembers which passages each window held."""

    def __init__(self, inner, calls: list[list[int]]) -> None:
        self.inner = inner
        self.calls = calls

    async def window(self, indices: list[int]) -> np.ndarray:
        self.calls.append(list(indices))
        return await self.inner.window(indices)


class _RecordingEmbedder:
    def __init__(self, inner, calls: list[list[int]]) -> None:
        self.inner = inner
        self.calls = calls

    async def prepare(self, passages):
        return _RecordingSource(await self.inner.prepare(passages), self.calls)


def _request(case: dict):
    from ..core.types import Passage, RerankRequest

    r = case["request"]
    return RerankRequest(query=r["query"], passages=tuple(Passage(p["id"], p["text"]) for p in r["passages"]),
                         window_size=r["window_size"], stride=r["stride"])


async def _replay_max_diff(model, stepper, request, windows: list[dict], calls: list[list[int]]) -> float:
    """Largest |score - float32 score| when ``model`` decodes along the float32 run's picks."""
    from ..core.embeddings import WindowEmbeddings
    from ..runtime.inprocess import TorchEncoder

    source = await WindowEmbeddings(TorchEncoder(model)).prepare(request.passages)
    worst = 0.0
    for record, indices in zip(windows, calls):
        embeds = await source.window(indices)
        state, scores = stepper.start(record["prompt_ids"], embeds)
        worst = max(worst, float(np.max(np.abs(scores - record["scores"][0]))))
        for pick, reference in zip(record["picks"], record["scores"][1:]):
            worst = max(worst, float(np.max(np.abs(stepper.step(state, pick) - reference))))
    return worst


async def conformance(folder: Path, device: str, dtype: str, limit: int | None = None) -> dict[str, Any]:
    """The conformance rankings on ``device`` in float32 (TF32 off), and agreement in ``dtype``.

    ``limit``: only the first cases of each checkpoint (they are ordered by size).
    """
    from ..core.embeddings import WindowEmbeddings
    from ..runtime.inprocess import TorchEncoder, in_process_reranker, stepper_for
    from ..runtime.model import load_model
    from ..core.reranker import Reranker

    missing = [name for name in CONFORMANCE_CHECKPOINTS if not (folder / f"{name}.cases.json").exists()]
    if missing:
        return {"skipped": f"no conformance vectors in {folder} (pass --conformance DIR)"}
    try:
        import sentencepiece  # noqa: F401  (the conformance checkpoints' slow Llama tokenizer)
        tokenizers = {name: None for name in CONFORMANCE_CHECKPOINTS}
        prompt_ids = "tokenizer"
    except ImportError:
        tokenizers = {name: load_recorded(folder, name) for name in CONFORMANCE_CHECKPOINTS}
        if None in tokenizers.values():
            return {"skipped": f"sentencepiece is not installed and {folder / RECORDED} is missing"}
        prompt_ids = f"recorded in {RECORDED} (sentencepiece is not installed)"

    def load(name: str, dtype: str):
        model = load_model(folder / name, dtype=dtype, device=device, prompt_tokenizer=tokenizers[name])
        return model, in_process_reranker(model)

    total = exact = agree = 0
    worst = 0.0
    scale = 0.0
    for name in CONFORMANCE_CHECKPOINTS:
        cases = json.loads((folder / f"{name}.cases.json").read_text())["cases"][:limit]
        with exact_float32():
            model32, _ = load(name, "float32")
            runs = []
            for case in cases:
                windows: list[dict] = []
                calls: list[list[int]] = []
                reranker = Reranker(_RecordingEmbedder(WindowEmbeddings(TorchEncoder(model32)), calls),
                                    _RecordingBackend(stepper_for(model32), windows),
                                    model32.prompts)
                request = _request(case)
                result = await reranker.rerank(request)
                exact += [r.id for r in result.ranking] == case["expected_ranking"]
                scale = max([scale] + [float(np.max(np.abs(s))) for w in windows for s in w["scores"]])
                runs.append((case, request, windows, calls))
            total += len(cases)
        if dtype == "float32":
            continue
        model, reranker = load(name, dtype)
        stepper = stepper_for(model)
        for case, request, windows, calls in runs:
            result = await reranker.rerank(request)
            agree += [r.id for r in result.ranking] == case["expected_ranking"]
            worst = max(worst, await _replay_max_diff(model, stepper, request, windows, calls))
    out: dict[str, Any] = {"float32": f"{exact}/{total}", "cases": total, "prompt_ids": prompt_ids}
    if dtype != "float32":
        out.update({dtype: f"{agree}/{total}", "max_abs_score_diff": worst, "max_abs_score_float32": scale})
    return out


# ---- whole queries


def _queries(data: Path, count: int):
    from .evaluation import load_rankllm

    queries = [q for q in load_rankllm(data) if len(q.hits) >= max(TOP_KS)][:count]
    if len(queries) < count:
        from .synthetic import SyntheticError

        raise SyntheticError(f"{data}: only {len(queries)} queries have {max(TOP_KS)} hits, {count} asked for")
    return queries


def _options(mode: str) -> dict[str, Any]:
    from ..core.types import Mode

    return {k: Mode(v) if k == "mode" else v for k, v in MODES[mode].items()}


async def run_query(reranker, clock: Clock, query, top_k: int, mode: str) -> dict[str, float]:
    from ..core.types import Timings
    from .evaluation import to_request

    request = to_request(query, top_k, **_options(mode))
    timings = Timings()
    clock.sync()
    t0 = time.perf_counter()
    result = await reranker.rerank(request, timings)
    clock.sync()
    return {"total_ms": (time.perf_counter() - t0) * 1e3, "encode_ms": timings.encode_ms,
            "prefill_ms": timings.prefill_ms, "decode_ms": timings.decode_ms,
            "decode_steps": result.stats.decode_steps, "windows": result.stats.windows,
            "prompt_tokens": result.stats.prompt_tokens, "cached_prompt_tokens": result.stats.cached_prompt_tokens}


async def measure_queries(reranker, clock: Clock, queries, top_k: int, repeats: int) -> dict[str, dict]:
    """Every mode on every query, interleaved query by query so noise hits all modes alike."""
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for query in queries:
        for _ in range(repeats):
            for mode in MODES:
                runs[mode].append(await run_query(reranker, clock, query, top_k, mode))
    return {mode: {key: median([r[key] for r in records]) for key in records[0]} | {"runs": len(records)}
            for mode, records in runs.items()}


# ---- decode steps


def _windows(model, queries, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` realistic 20-passage windows: (prompt ids, projected embeddings), encoded once."""
    out = []
    for i in range(count):
        query = queries[i % len(queries)]
        start = (WINDOW * (i // len(queries))) % (len(query.hits) - WINDOW + 1)
        texts = [h.content for h in query.hits[start : start + WINDOW]]
        ids, _ = model.prompts.build(query.text, WINDOW)
        out.append((ids, model.project(model.encode(texts))))
    return out


def measure_steps(model, stepper, clock: Clock, queries, batches: list[int], warmup: int,
                  repeats: int, graphs: bool = False) -> dict[str, Any]:
    """ms and ATen operator calls per decode step on the engine's KV pool at each batch size.

    ``step_ms`` is the reference step (one window on its own cache); ``step_ms_by_batch`` the pool's
    one batched step (its lone-window path at batch 1), fresh 20-passage windows each time. A
    20-passage window takes at most 18 steps, so ``warmup + repeats`` <= 18 keeps every window
    within its real decode length. ``graphs``: also with the step captured as CUDA graphs.
    """
    from ..runtime.pool import PoolStepper

    windows = _windows(model, queries, max(batches))
    state, _ = stepper.start(*windows[0])
    single = [clock.ms(lambda: stepper.step(state, s % WINDOW))[0] for s in range(warmup + repeats)][warmup:]
    del state
    max_len = max(len(ids) for ids, _ in windows) + WINDOW
    result: dict[str, Any] = {"step_ms": median(single)}
    for label, capture in (("", False), ("_graphs", True)) if graphs else (("", False),):
        pool = PoolStepper(stepper, slots=max(batches), max_len=max_len, max_passages=WINDOW, graphs=capture)
        by_batch, ops, prefill = _pool_steps(pool, clock, windows, batches, warmup, repeats)
        result[f"step_ms_by_batch{label}"] = by_batch
        if not label:
            result["ops_per_step_by_batch"] = ops
            result["prefill_ms_window"] = median(prefill)
        del pool
    by_batch = result["step_ms_by_batch"]
    result.update({
        "step_ms_per_query_step_by_batch": {b: ms / b for b, ms in by_batch.items()},
        "step32_over_step1": by_batch[32] / by_batch[1] if 1 in by_batch and 32 in by_batch else None,
        "prompt_tokens_window": int(np.median([len(w[0]) for w in windows])),
    })
    return result


def _pool_steps(pool, clock: Clock, windows, batches: list[int], warmup: int, repeats: int):
    import torch

    by_batch: dict[int, float] = {}
    ops: dict[int, int] = {}
    prefill: list[float] = []
    for batch in batches:
        for slot, (ids, embeds) in enumerate(windows[:batch]):
            def enter(slot=slot, ids=ids, embeds=embeds):
                begun = pool.begin(slot, ids, embeds)
                pool.advance(begun, begun.remaining)
                return pool.finish(begun)

            prefill.append(clock.ms(enter)[0])
        slots = list(range(batch))
        times = [clock.ms(lambda: pool.step(slots))[0] for _ in range(warmup + repeats - 1)][warmup:]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pool.step(slots)
        ops[batch] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        by_batch[batch] = median(times)
        for slot in slots:
            pool.free(slot)
    return by_batch, ops, prefill


# ---- the run


def versions(device) -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "transformers": transformers.__version__, "numpy": np.__version__}


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)

    return f"cpu: {machine_info()['cpu']}"


def check_environment(device: str) -> tuple[object, str | None]:
    """The torch device, and a warning if transformers is older than tested; unusable set-ups raise."""
    import torch
    import transformers

    from .synthetic import SyntheticError

    if device != "cpu" and not device.startswith("cuda"):
        raise SyntheticError(f"--device {device}: expected cuda, cuda:N or cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SyntheticError(f"--device {device}: torch {torch.__version__} sees no CUDA device "
                             f"(built for CUDA {torch.version.cuda}); use --device cpu")
    found = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    wanted = ".".join(map(str, MIN_TRANSFORMERS))
    if found[:1] < MIN_TRANSFORMERS[:1]:
        raise SyntheticError(f"transformers {transformers.__version__} is too old: pe_rank's core needs >= {wanted} "
                             "(its KV cache API)")
    warning = f"transformers {transformers.__version__} is older than the tested >= {wanted}" if found < MIN_TRANSFORMERS else None
    return torch.device(device), warning


async def run(args: argparse.Namespace, start: float) -> dict[str, Any]:
    import torch

    from ..runtime.inprocess import in_process_reranker, stepper_for
    from ..runtime.model import torch_dtype
    from .synthetic import SHAPES, build_synthetic, decode_step_weight_bytes, parameter_count

    device, warning = check_environment(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock, memory = Clock(device), Memory(device)
    name = device_name(device)
    result: dict[str, Any] = {
        "device": name, "device_type": device.type, "dtype": args.dtype, "shape": args.synthetic, "about": SHAPES[args.synthetic].about,
        "versions": versions(device), "phases_s": {}, "peak_memory_gb": {},
    }
    import transformers

    if warning:
        log(f"warning: {warning}", start)
    log(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
        f"{transformers.__version__}, numpy {np.__version__}", start)

    def phase_done(key: str, t0: float) -> None:
        result["phases_s"][key] = round(time.monotonic() - t0, 2)
        result["peak_memory_gb"][key] = round(memory.peak_gb(), 3)

    t0 = time.monotonic()
    queries = _queries(args.data, args.queries)
    steps_only = args.only == "steps"
    if args.conformance is not None and not steps_only:
        log(f"fidelity: conformance cases on {device} in float32 (TF32 off) and {args.dtype}", start)
        memory.reset()
        result["conformance"] = await conformance(args.conformance, args.device, args.dtype, args.conformance_cases)
        phase_done("conformance", t0)
        log(f"fidelity: {result['conformance']}", start)
    else:
        result["conformance"] = {"skipped": "--only steps" if steps_only else "--no-conformance"}
    result["conformance_float32"] = result["conformance"].get("float32", "skipped")

    t0 = time.monotonic()
    log(f"building synthetic {args.synthetic} on {device} in {args.dtype} (random weights, made on the device)", start)
    memory.reset()
    model = build_synthetic(args.synthetic, device, torch_dtype(args.dtype), seed=args.seed)
    clock.sync()
    weight_bytes = decode_step_weight_bytes(model.llm)
    result["model"] = {"llm_parameters": parameter_count(model.llm), "projector_parameters": parameter_count(model.projector),
                       "encoder_parameters": parameter_count(model.encoder), "decode_step_weight_bytes": weight_bytes,
                       "allocated_gb": memory.allocated_gb()}
    phase_done("build", t0)
    log(f"built: LLM {result['model']['llm_parameters'] / 1e9:.3f} G parameters, {weight_bytes / 1e9:.2f} GB read "
        f"per decode step, in {result['phases_s']['build']:.1f} s", start)

    lengths = [len(model.prompts.build(q.text, WINDOW)[0]) for q in queries]
    result["prompt_tokens_top20"] = int(np.median(lengths))
    result["prompt_tokens_top20_each"] = lengths
    result["prompt_head_tokens"] = len(model.prompts.shared_head(WINDOW))
    log(f"prompt lengths of a {WINDOW}-passage window (tokenizer {model.info.folder.name}): {lengths}; "
        f"shared head {result['prompt_head_tokens']} tokens", start)

    reranker = in_process_reranker(model)
    result["queries"] = {}
    for top_k in () if steps_only else TOP_KS:
        if not result["queries"]:
            t0 = time.monotonic()
            log(f"warm-up: one query at top-{WINDOW} in modes {', '.join(MODES)}", start)
            for mode in MODES:
                await run_query(reranker, clock, queries[0], WINDOW, mode)
            phase_done("warmup", t0)
        t0 = time.monotonic()
        log(f"queries: {len(queries)} x {args.repeats} repeats at top-{top_k}, modes {', '.join(MODES)}", start)
        memory.reset()
        result["queries"][f"top{top_k}"] = await measure_queries(reranker, clock, queries, top_k, args.repeats)
        phase_done(f"top{top_k}", t0)
        full = result["queries"][f"top{top_k}"]["full"]
        log(f"top-{top_k} full: {full['total_ms']:.0f} ms (encode {full['encode_ms']:.0f}, prefill "
            f"{full['prefill_ms']:.0f}, decode {full['decode_ms']:.0f} in {full['decode_steps']:.0f} steps)", start)

    t0 = time.monotonic()
    log(f"decode steps: the reference step at batch 1, the pool's step at batches {args.batches}", start)
    memory.reset()
    steps = measure_steps(model, stepper_for(model), clock, queries, args.batches, args.step_warmup, args.step_repeats,
                          graphs=device.type == "cuda")
    result.update(steps)
    phase_done("steps", t0)
    log(f"steps: {steps['step_ms']:.2f} ms at batch 1; by batch {_rounded(steps['step_ms_by_batch'])}; "
        f"ATen ops per step {steps['ops_per_step_by_batch']}", start)

    q = result["queries"]

    def query_ms(top: int, mode: str, key: str = "total_ms") -> float | None:
        return q.get(f"top{top}", {}).get(mode, {}).get(key)

    result.update({
        "prefill_ms": query_ms(20, "full", "prefill_ms"),
        "top20_full_ms": query_ms(20, "full"), "top20_top10_ms": query_ms(20, "top10"),
        "top20_first_ms": query_ms(20, "first"),
        "top100_full_ms": query_ms(100, "full"), "top100_top10_ms": query_ms(100, "top10"),
        "top100_first_ms": query_ms(100, "first"),
    })
    bandwidth = args.bandwidth_gbs or (known_bandwidth(name) if device.type == "cuda" else None)
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3 if bandwidth else None
    result["floor"] = {
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": "--bandwidth-gbs" if args.bandwidth_gbs else ("table" if bandwidth else None),
        "weight_read_ms": floor_ms,
        "step_over_floor": result["step_ms"] / floor_ms if floor_ms else None,
        "step_over_floor_by_batch": {b: ms / floor_ms for b, ms in result["step_ms_by_batch"].items()} if floor_ms else None,
        "paper_top100_s": PAPER_TOP100_S, "top100_full_over_paper": _over(result["top100_full_ms"], PAPER_TOP100_S),
        "paper_top20_s": PAPER_TOP20_S, "top20_full_over_paper": _over(result["top20_full_ms"], PAPER_TOP20_S),
    }
    result["peak_memory_gb"]["max"] = max(result["peak_memory_gb"].values())
    result["settings"] = {"queries": args.queries, "repeats": args.repeats, "step_warmup": args.step_warmup,
                          "step_repeats": args.step_repeats, "batches": args.batches, "seed": args.seed,
                          "data": str(args.data), "qids": [qq.qid for qq in queries]}
    return result


def _over(ms: float | None, paper_s: float) -> float | None:
    return None if ms is None else ms / 1e3 / paper_s


def _rounded(values: dict) -> dict:
    return {k: round(v, 2) for k, v in values.items()}


def _ms_to_s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report_markdown(r: dict[str, Any]) -> str:
    floor = r["floor"]
    lines = [
        f"# Synthetic PE-Rank bench: {r['shape']}, {r['dtype']}, {r['device']}",
        "",
        f"{r['about']}. Random weights made on the device; rankings mean nothing, costs are real.",
        f"Measured {r.get('date', '?')} at commit {r.get('commit', '?')[:10]}; host {r.get('host', '?')}; "
        f"torch {r['versions']['torch']} (CUDA {r['versions']['cuda']}), transformers {r['versions']['transformers']}, "
        f"numpy {r['versions']['numpy']}.",
        f"LLM {r['model']['llm_parameters'] / 1e9:.3f} G parameters; one decode step reads "
        f"{r['model']['decode_step_weight_bytes'] / 1e9:.3f} GB of weights. Peak memory "
        f"{'(GPU, allocated)' if r['device_type'] == 'cuda' else '(process RSS)'}: {r['peak_memory_gb']['max']:.2f} GB.",
        f"Prompt of a {WINDOW}-passage window: {r['prompt_tokens_top20']} tokens (median; "
        f"{r['prompt_head_tokens']} of them the cached shared head).",
        "",
        f"## Whole queries (median of {r['settings']['queries']} DL19 queries x {r['settings']['repeats']} repeats, after warm-up)",
        "",
        "| top-k | mode | total ms | encode ms | prefill ms | decode ms | decode steps | windows | prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for top, modes in r["queries"].items():
        for mode, m in modes.items():
            lines.append(f"| {top[3:]} | {mode} | {_f(m['total_ms'])} | {_f(m['encode_ms'])} | {_f(m['prefill_ms'])} | "
                         f"{_f(m['decode_ms'])} | {m['decode_steps']:.0f} | {m['windows']:.0f} | {m['prompt_tokens']:.0f} |")
    lines += [
        "",
        f"Top-100 full: **{_f(_ms_to_s(r['top100_full_ms']), 2)} s** per query against the paper's {PAPER_TOP100_S} s "
        f"(ratio {_f(floor['top100_full_over_paper'], 2)}); top-20 full {_f(_ms_to_s(r['top20_full_ms']), 3)} s against "
        f"about {PAPER_TOP20_S} s (ratio {_f(floor['top20_full_over_paper'], 2)}).",
        "",
        f"## Decode steps (median of {r['settings']['step_repeats']} after {r['settings']['step_warmup']} warm-up, "
        f"fresh {WINDOW}-passage windows)",
        "",
        f"Weight-read floor: {_f(floor['weight_read_ms'], 2)} ms per step "
        + (f"({floor['bandwidth_gbs']:.0f} GB/s, {floor['bandwidth_source']})." if floor["bandwidth_gbs"]
           else "(unknown bandwidth: pass --bandwidth-gbs)."),
        "",
        "| batch | ms per step | ms per query-step | ATen ops per step | floor ms | step / floor |",
        "|---|---|---|---|---|---|",
        f"| 1 (reference `step`, own cache) | {_f(r['step_ms'], 2)} | {_f(r['step_ms'], 2)} | - | "
        f"{_f(floor['weight_read_ms'], 2)} | {_f(floor['step_over_floor'], 2)} |",
    ]
    graphs = r.get("step_ms_by_batch_graphs") or {}
    for b, ms in r["step_ms_by_batch"].items():
        ratio = floor["step_over_floor_by_batch"][b] if floor["step_over_floor_by_batch"] else None
        lines.append(f"| {b} (pool step) | {_f(ms, 2)} | {_f(ms / int(b), 2)} | {r['ops_per_step_by_batch'].get(b, '-')} "
                     f"| {_f(floor['weight_read_ms'], 2)} | {_f(ratio, 2)} |")
    lines.append(f"\nstep(32) / step(1) on the pool: {_f(r.get('step32_over_step1'), 2)}.")
    if graphs:
        lines.append("With CUDA graphs (ms per step by batch): " + ", ".join(f"{b}: {_f(ms, 2)}" for b, ms in graphs.items()))
    c = r["conformance"]
    lines += ["", "## Fidelity on the device", ""]
    if "skipped" in c:
        lines.append(f"Conformance skipped: {c['skipped']}.")
    else:
        lines.append(f"Conformance rankings in float32 (TF32 off): **{c['float32']}**.")
        if r["dtype"] in c:
            lines.append(f"In {r['dtype']}: {c[r['dtype']]} agree exactly; largest score difference along the float32 "
                         f"decoding path {c['max_abs_score_diff']:.3g} (scores up to {c['max_abs_score_float32']:.3g}).")
    lines += ["", "## Phases", "", "| phase | s | peak memory GB |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {r['peak_memory_gb'].get(k, '-')} |" for k, v in r["phases_s"].items()]
    lines.append(f"| total | {r.get('total_s', '-')} | {r['peak_memory_gb']['max']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .synthetic import SHAPES

    p = argparse.ArgumentParser(prog="pe-rank bench --synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", required=True, choices=sorted(SHAPES), help="model shape (random weights)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--queries", type=int, default=3, help="DL19 queries (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each query and mode (default 2)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64", help="decode-step batch sizes on the KV pool")
    p.add_argument("--step-warmup", type=int, default=3)
    p.add_argument("--step-repeats", type=int, default=12)
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="device memory bandwidth in GB/s for the weight-read floor (default: a table of known GPUs)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="RankLLM JSON of BM25 candidates")
    p.add_argument("--conformance", type=Path, default=DEFAULT_CONFORMANCE, help="conformance vectors folder")
    p.add_argument("--no-conformance", dest="conformance", action="store_const", const=None)
    p.add_argument("--conformance-cases", type=int, default=None,
                   help="only the first N (smallest) cases of each conformance checkpoint (default all 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--only", choices=["steps"], default=None,
                   help="steps: only the decode-step measurements (no conformance, no whole queries; minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    args = p.parse_args(argv)
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",")})
    except ValueError:
        p.error(f"--batches: expected comma-separated integers, got {args.batches!r}")
    for name in ("queries", "repeats", "step_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batches[0] < 1 or args.step_warmup < 0 or args.step_warmup + args.step_repeats > WINDOW - 2:
        p.error(f"batches must be >= 1 and --step-warmup + --step-repeats <= {WINDOW - 2} "
                f"(the steps of one {WINDOW}-passage window)")
    if args.bandwidth_gbs is not None and args.bandwidth_gbs <= 0:
        p.error("--bandwidth-gbs must be positive")
    if not args.data.exists():
        p.error(f"--data {args.data}: not found (a source checkout has tests/data/bm25_dl19.json.gz)")
    return args


def cli_main(argv: list[str]) -> int:
    from .evaluation import EvalError
    from .synthetic import SyntheticError

    args = parse_args(argv)
    start = time.monotonic()
    try:
        result = asyncio.run(run(args, start))
    except (EvalError, SyntheticError) as exc:
        raise UserError(str(exc)) from None
    result.update(total_s=round(time.monotonic() - start, 1), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  commit=git_commit(), host=platform.node())
    stem = result_stem(args.out, f"synthetic-{args.synthetic}-{args.device.split(':')[0]}-{args.dtype}")
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(report_markdown(result))
    log(f"done in {result['total_s']} s; written {stem}.json / .md", start)
    print(json.dumps(result) if args.json else report_markdown(result))
    return 0
