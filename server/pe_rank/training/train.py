"""``pe-rank train``: stage 1 and/or stage 2 on a checkpoint, into a new checkpoint folder."""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..runtime.model import PeRankModel, load_model
from .data import TrainingData, load_data
from .distill import DistillOptions, DistillSet, build_distill_set, distill_windows, prepare_cache
from .embeddings import EmbeddingCache
from .loop import StageConfig, StageResult, load_state, make_optimizer, run_stage, save_state
from .adapter import attach_lora, merged_weights, save_adapter
from .output import (ADAPTER_DIR, CACHE_FILE, LLM_LAYERS_FILE, STATE_FILE, append_report, link_checkpoint,
                     record_in_config, write_projector, write_weights)
from .tasks import ALIGN_MESSAGE, AdapterTask, AlignmentTask, RankingTask, Task, WordsAlignmentTask

STAGE_NAMES = {1: "alignment", 2: "ranking", 3: "adapter"}


class TrainError(ValueError):
    """A usage mistake (printed as one ``error:`` line)."""


@dataclass(frozen=True)
class TrainOptions:
    model: Path
    out: Path
    stages: tuple[int, ...] = (1, 2)
    data: Path = Path("data/train")
    steps: dict[int, int] = field(default_factory=lambda: {1: 100, 2: 100, 3: 300})
    lr: dict[int, float] = field(default_factory=lambda: {1: 1e-3, 2: 2e-4, 3: 5e-4})
    batch: dict[int, int] = field(default_factory=lambda: {1: 4, 2: 1, 3: 1})
    align: str = "reconstruct"  # stage 1: "reconstruct" the passage text, or match its "words" embedding
    adapter_layers: int = 6  # stage 3: LoRA on the LLM's top K layers
    adapter_rank: int = 8
    adapter_pool: int = 512  # stage 3: windows drawn once; their lower-layer states are cached
    window: int = 20
    pseudo_queries: int = 0  # stages 2 and 3: extra cosine-taught queries made from training passages
    query_weight: float = 0.0  # stage 3: weight of the query loss next to ListMLE
    carried: float = 0.0  # stage 3: share of the pool drawn as sliding-pass (carried) windows
    seed: int = 0
    resume: bool = False
    max_minutes: float | None = None
    save_every: int = 25
    log_every: int = 5
    warmup: int = 10
    target_tokens: int = 64
    device: str = "auto"
    command: str = ""
    distill: DistillOptions | None = None  # stage 3 on teacher-labelled windows of many real queries
    lr_decay: bool = False  # linear decay to 0 at the last step of each stage


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def freeze_all_but_projector(model: PeRankModel) -> dict[str, torch.nn.Module]:
    """Encoder and LLM frozen; the returned modules train (stage 3 adds its LoRA adapter)."""
    for module in (model.llm, model.encoder):
        module.requires_grad_(False).eval()
    model.projector.float().requires_grad_(True).train()
    if not any(True for _ in model.projector.parameters()):
        raise TrainError(f"projector_type {model.info.projector_type!r} has no weights to train")
    return {"projector": model.projector}


def first_adapted_layer(model: PeRankModel, opts: TrainOptions) -> int:
    layers = len(model.llm.layers)
    if not 1 <= opts.adapter_layers <= layers:
        raise TrainError(f"--adapter-layers must lie in [1, {layers}] for this checkpoint")
    return layers - opts.adapter_layers


def add_adapter(model: PeRankModel, trainable: dict[str, torch.nn.Module], opts: TrainOptions) -> None:
    """Stage 3: the projector freezes and LoRA on the top layers trains (idempotent)."""
    model.projector.requires_grad_(False).eval()
    if "adapter" not in trainable:
        trainable["adapter"] = attach_lora(model.llm, first_adapted_layer(model, opts), opts.adapter_rank, opts.seed)


def make_task(stage: int, model: PeRankModel, cache: EmbeddingCache, data: TrainingData,
              opts: TrainOptions, distilled: DistillSet | None = None) -> Task:
    if stage == 3 and distilled is not None:
        assert opts.distill is not None
        needed = opts.steps[3] * opts.batch[3]
        epochs = -(-needed // len(distilled.queries))
        return AdapterTask(model, cache, data, model.llm, first_adapted_layer(model, opts), opts.batch[3],
                           opts.adapter_pool, opts.window, opts.seed, opts.query_weight,
                           given=distill_windows(distilled, opts.distill, epochs))
    if stage == 1 and opts.align == "words":
        return WordsAlignmentTask(model, cache, data.passages(), opts.batch[1], opts.target_tokens)
    if stage == 1:
        return AlignmentTask(model, cache, data.passages(), opts.batch[1], opts.target_tokens)
    if stage == 3:
        return AdapterTask(model, cache, data, model.llm, first_adapted_layer(model, opts), opts.batch[3],
                           opts.adapter_pool, opts.window, opts.seed, opts.query_weight, opts.carried)
    return RankingTask(model, cache, data, opts.batch[2], opts.window)


def write_trained(out: Path, model: PeRankModel, trainable: dict[str, torch.nn.Module]) -> None:
    """The projector, and with stage 3 the adapter-merged top layers and the PEFT adapter itself."""
    write_projector(out, model.projector)
    if "adapter" in trainable:
        write_weights(out, LLM_LAYERS_FILE, merged_weights(model.llm, prefix="model."))
        save_adapter(trainable["adapter"], out / ADAPTER_DIR)


def _check_out(opts: TrainOptions) -> dict | None:
    """The saved state when resuming; refuses to overwrite the input or another run."""
    if opts.out.resolve() == opts.model.resolve():
        raise TrainError(f"--out {opts.out} is the input checkpoint; write to a new folder")
    state_path = opts.out / STATE_FILE
    if opts.resume:
        if not state_path.exists():
            raise TrainError(f"{state_path}: missing, nothing to resume")
        state = load_state(state_path)
        if state["seed"] != opts.seed:
            raise TrainError(f"{state_path}: saved with --seed {state['seed']}, resume with the same seed")
        if state["stage"] > max(opts.stages):
            raise TrainError(f"{state_path}: the run is already in stage {state['stage']}")
        return state
    if opts.out.exists() and any(opts.out.iterdir()):
        raise TrainError(f"--out {opts.out} exists and is not empty (use --resume or a new folder)")
    return None


def _check_distill(opts: TrainOptions) -> None:
    if opts.distill is None:
        return
    if 2 in opts.stages:
        raise TrainError("--queries (distillation) trains stages 1 and 3; stage 2 draws from --data's own queries")
    if opts.pseudo_queries:
        raise TrainError("--queries and --pseudo-queries do not go together")
    if opts.carried:
        raise TrainError("--queries draws its windows as the ranker meets them; --carried-windows is for --data")
    if opts.distill.window != opts.window:
        raise TrainError("the distillation windows and --window differ")


def distill_cache(model: PeRankModel, opts: DistillOptions) -> EmbeddingCache:
    """The encoder cache the labels were built with (shared by runs on the same pool)."""
    prepare_cache(opts.cache)
    return EmbeddingCache(model, opts.cache / CACHE_FILE)


def prepare_distillation(opts: TrainOptions, log: Callable[[str], None] = print) -> DistillSet:
    """Only build (or load) the labelled distillation set: ``pe-rank train --prepare-only``."""
    if opts.distill is None:
        raise TrainError("--prepare-only goes with --queries")
    model = load_model(opts.model, device=pick_device(opts.device))
    cache = distill_cache(model, opts.distill)
    distilled = build_distill_set(opts.distill, cache, log)
    cache.save()
    log(distilled.summary())
    return distilled


def train(opts: TrainOptions, log: Callable[[str], None] = print) -> list[StageResult]:
    """Run the requested stages; returns what each stage run did."""
    deadline = None if opts.max_minutes is None else time.monotonic() + opts.max_minutes * 60
    _check_distill(opts)
    state = _check_out(opts)
    # with --queries, --data is the passage pool: its passages align (stage 1), its queries do not train
    data = load_data(opts.data).with_pseudo_queries(opts.pseudo_queries, opts.window, opts.seed)
    torch.manual_seed(opts.seed)
    device = pick_device(opts.device)
    log(f"loading {opts.model} on {device}; data {opts.data}: "
        + ("passage pool for --queries" if opts.distill else data.summary()))
    model = load_model(opts.model, device=device)
    trainable = freeze_all_but_projector(model)
    if state is not None:
        if "adapter" in state["trainable"]:
            add_adapter(model, trainable, opts)
        for name, module in trainable.items():
            module.load_state_dict(state["trainable"][name], strict=name != "adapter")
        log(f"resuming stage {state['stage']} at step {state['step']}")
    else:
        link_checkpoint(opts.model, opts.out)
        write_projector(opts.out, model.projector)
    distilled = None
    if opts.distill is not None:
        cache = distill_cache(model, opts.distill)
        distilled = build_distill_set(opts.distill, cache, log)
        cache.save()
        log(distilled.summary())
    else:
        cache = EmbeddingCache(model, opts.out / CACHE_FILE)
    results = []
    for stage in opts.stages:
        result = _run_one(stage, state, model, trainable, cache, data, opts, deadline, log, distilled)
        if state is not None and stage >= state["stage"]:
            state = None  # the saved stage is reached; stages after it start afresh
        if result is None:
            continue
        results.append(result)
        if result.stopped:
            log(f"stopped in stage {stage} at step {result.step}: {result.stopped}")
            break
    log(f"wrote {opts.out}")
    return results


def _run_one(stage: int, state: dict | None, model: PeRankModel, trainable: dict[str, torch.nn.Module],
             cache: EmbeddingCache, data: TrainingData, opts: TrainOptions, deadline: float | None,
             log: Callable[[str], None], distilled: DistillSet | None = None) -> StageResult | None:
    if stage == 3:
        add_adapter(model, trainable, opts)
    config = StageConfig(steps=opts.steps[stage], lr=opts.lr[stage], seed=opts.seed, warmup=opts.warmup,
                         decay=opts.lr_decay,
                         save_every=opts.save_every, log_every=opts.log_every)
    optimizer = make_optimizer(trainable, config)
    start_step, losses = 0, []
    if state is not None and stage < state["stage"]:
        log(f"stage {stage} already done (state is in stage {state['stage']})")
        return None
    if state is not None and stage == state["stage"]:
        start_step, losses = state["step"], state["losses"]
        optimizer.load_state_dict(state["optimizer"])
    if start_step >= config.steps:
        log(f"stage {stage} already at step {start_step} of {config.steps}")
        return None
    task = make_task(stage, model, cache, data, opts, distilled)

    def checkpoint(step: int, seen: list[float]) -> None:
        save_state(opts.out / STATE_FILE, stage, step, trainable, optimizer, opts.seed, seen)
        write_trained(opts.out, model, trainable)
        cache.save()

    log(f"stage {stage} ({STAGE_NAMES[stage]}): steps {start_step}..{config.steps}, lr {config.lr:g}, "
        f"batch {opts.batch[stage]}" + (f", window {opts.window}" if stage >= 2 else ""))
    result = run_stage(task, trainable, config, optimizer=optimizer, start_step=start_step,
                       deadline=deadline, checkpoint=checkpoint, log=log, losses=losses)
    record_in_config(opts.out, stage, {"steps": result.step, "seed": opts.seed, "lr": config.lr,
                                       "batch": opts.batch[stage], "data": [f.name for f in data.files]}
                     | ({"distill": distilled.notes} if distilled is not None and stage == 3 else {}))
    append_report(opts.out, report_section(result, config, data, opts, model, distilled))
    return result


def file_digest(path: Path) -> str:
    """A short sha256 of a file, to name exactly which data or weights a run used."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"{platform.node()} ({platform.system()} {platform.release()}), {cpu}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads{gpu}")


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.4f}" if values else "-"


def _task_details(stage: int, opts: TrainOptions, distilled: DistillSet | None = None) -> str:
    if stage == 3 and distilled is not None:
        d = opts.distill
        assert d is not None
        query = (f"; plus {opts.query_weight:g} x query loss (1 - cos(W.T h, D q) per decision row)"
                 if opts.query_weight > 0 else "")
        return (f"distillation: {distilled.summary()}; one window of {d.window} per query and epoch, as the "
                f"ranker meets it ({1 - d.bm25_share:.0%} cascade: encoder-cosine order, sliding {d.window}/"
                f"{d.stride} over the top {'/'.join(map(str, d.depths))}; {d.bm25_share:.0%} the sliding pass "
                f"over the BM25 list), the pass simulated with the teacher as ranker; ListMLE over the "
                f"teacher's order on s_i = h . e_i{query}; LoRA rank {opts.adapter_rank} on the top "
                f"{opts.adapter_layers} LLM layers; labels {distilled.notes.get('labels')}")
    ranking = (f"windows of {opts.window} from the BM25 top-100, random offset, shuffled; teacher = qrels grade "
               "then encoder cosine (cosine only without qrels); ListMLE on s_i = h . e_i")
    if stage == 3:
        query = (f"; plus {opts.query_weight:g} x query loss (1 - cos(W.T h, D q) per decision row)"
                 if opts.query_weight > 0 else "")
        carried = (f"; {opts.carried:.0%} of the pool drawn as sliding-pass windows (hits [s, s+{opts.window // 2}) "
                   "of a real query plus the teacher's best of all hits below)" if opts.carried > 0 else "")
        return (f"{ranking}{query}{carried}; LoRA rank {opts.adapter_rank} on the top {opts.adapter_layers} LLM layers "
                f"(q/k/v/o/gate/up/down), a pool of {opts.adapter_pool} windows whose lower-layer states are cached")
    if stage == 2:
        return ranking
    if opts.align == "words":
        return (f"regress each soft token onto the IDF-weighted mean input embedding of the passage's first "
                f"{opts.target_tokens} LLM tokens (squared error / mean row norm^2)")
    return (f'user message "{ALIGN_MESSAGE}", targets cut to {opts.target_tokens} LLM tokens, '
            "loss = cross-entropy on the passage tokens")


def report_section(result: StageResult, config: StageConfig, data: TrainingData, opts: TrainOptions,
                   model: PeRankModel, distilled: DistillSet | None = None) -> str:
    stage = result.stage
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run_losses = result.losses[result.start_step:]
    details = _task_details(stage, opts, distilled)
    lines = [
        f"## Stage {stage} ({STAGE_NAMES[stage]}), {when}",
        "",
        f"- command: `{opts.command or '(called from Python)'}`",
        f"- input checkpoint: `{opts.model}` (projector `{model.info.projector_type}`; encoder frozen; "
        + ("projector and lower LLM layers frozen)" if stage == 3 else "LLM frozen)"),
        (f"- data: `{opts.data}` as the passage pool (its queries do not train); queries: "
         f"{distilled.extracted.summary() if distilled.extracted else '-'}" if distilled is not None
         else f"- data: `{opts.data}`: {data.summary()}"),
        "- files: " + ", ".join(f"`{f.name}` (sha256 {file_digest(f)})" for f in data.files),
        f"- task: {details}",
        f"- seed {opts.seed}; steps {result.start_step} -> {result.step} of {config.steps}"
        + (f" (resumed at {result.start_step})" if result.start_step else "")
        + (f"; stopped early: {result.stopped}" if result.stopped else ""),
        f"- AdamW lr {config.lr:g} (linear warm-up {config.warmup} steps, then "
        f"{'linear decay to 0' if config.decay else 'constant'}), weight decay "
        f"{config.weight_decay:g}, grad-norm clip {config.max_grad_norm:g}, batch {opts.batch[stage]}, fp32",
        f"- loss: mean of the first 10 steps of this run {_mean(run_losses[:10])}, "
        f"of the last 10 {_mean(run_losses[-10:])}",
        f"- wall time: {result.wall_s:.0f} s for {result.step - result.start_step} steps"
        + (f" ({result.wall_s / (result.step - result.start_step):.2f} s/step)" if result.step > result.start_step else ""),
        f"- machine: {machine()}; device {model.device}",
    ]
    return "\n".join(lines)
