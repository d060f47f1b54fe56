"""The training loop of one stage: AdamW on the trainable modules, resumable, time-boxed.

Everything a resumed run needs is in ``train_state.pt``: the stage, the next step, the
trainable weights and the optimizer. Batches depend only on (seed, stage, step), so a run
stopped and resumed takes the same steps as one that never stopped.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .adapter import adapter_state
from .tasks import Task, step_rng

STATE_FORMAT = 1


@dataclass(frozen=True)
class StageConfig:
    steps: int
    lr: float
    seed: int
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 25
    log_every: int = 5
    decay: bool = False  # linear decay to 0 at ``steps`` after the warm-up (then the schedule depends on steps)


@dataclass
class StageResult:
    stage: int
    start_step: int
    step: int
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    stopped: str = ""  # why it ended before ``steps`` ("" when it finished)


def learning_rate(config: StageConfig, step: int) -> float:
    """Linear warm-up, then constant: independent of the total, so --steps may grow on resume.
    With ``decay``, linear decay from the end of the warm-up to 0 at ``steps``."""
    lr = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
    if config.decay and step >= config.warmup:
        lr *= max(0.0, (config.steps - step) / max(config.steps - config.warmup, 1))
    return lr


def save_state(path: Path, stage: int, step: int, trainable: dict[str, nn.Module],
               optimizer: torch.optim.Optimizer, seed: int, losses: list[float]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({
        "format": STATE_FORMAT, "stage": stage, "step": step, "seed": seed, "losses": losses,
        "trainable": {name: adapter_state(module) if name == "adapter" else module.state_dict()
                      for name, module in trainable.items()},
        "optimizer": optimizer.state_dict(),
    }, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown training state format {state.get('format')!r}")
    return state


def make_optimizer(trainable: dict[str, nn.Module], config: StageConfig) -> torch.optim.AdamW:
    params = [p for module in trainable.values() for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def run_stage(task: Task, trainable: dict[str, nn.Module], config: StageConfig, *,
              optimizer: torch.optim.AdamW, start_step: int, deadline: float | None,
              checkpoint: Callable[[int, list[float]], None], log: Callable[[str], None],
              losses: list[float] | None = None) -> StageResult:
    """Steps ``start_step .. config.steps - 1``; ``checkpoint(step, losses)`` saves everything."""
    result = StageResult(task.stage, start_step, start_step, losses=list(losses or []))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    t_start = time.monotonic()
    last_step_s = 0.0
    for step in range(start_step, config.steps):
        if deadline is not None and time.monotonic() + last_step_s > deadline:
            result.stopped = "time limit (--max-minutes)"
            break
        t0 = time.monotonic()
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = step_rng(config.seed, task.stage, step)
        # a task with given windows takes them in order (sample_at); others draw from the step's generator
        batch = task.sample_at(step, rng) if hasattr(task, "sample_at") else task.sample(rng)
        loss = task.loss(batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"stage {task.stage} step {step}: loss is {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        last_step_s = time.monotonic() - t0
        result.losses.append(loss.item())
        result.step = step + 1
        done = result.step - start_step
        if done == 1 or result.step % config.log_every == 0 or result.step == config.steps:
            elapsed = time.monotonic() - t_start
            recent = result.losses[-config.log_every:]
            log(f"stage {task.stage} step {result.step}/{config.steps} loss {loss.item():.4f} "
                f"avg{len(recent)} {sum(recent) / len(recent):.4f} lr {lr:.2e} "
                f"{done / elapsed:.3f} steps/s ({elapsed / done:.2f} s/step) elapsed {elapsed:.0f}s")
        if result.step % config.save_every == 0 and result.step < config.steps:
            checkpoint(result.step, result.losses)
    result.wall_s = time.monotonic() - t_start
    checkpoint(result.step, result.losses)
    return result
