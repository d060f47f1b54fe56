"""Shared memory for Triton's Python backend, sized from the window shape.

Every Python-model instance talks to Triton through its own shared-memory region in ``/dev/shm``
(python_backend: 1 MiB at start, grown in 1 MiB steps by default). What flows through it is
windows: pe_llm's ``PASSAGE_EMBEDS`` is ``window x hidden`` fp32 (100 passages at hidden 4096 is
1.6 MB), held for as long as the window is live in the engine, and pe_rank receives the same
array back from its pe_embed BLS call. So:

* ``shm-default-byte-size``: one largest window plus 1 MiB, so a single window never makes a
  region grow (a grow is a remap of the region under a lock);
* ``shm-growth-byte-size``: one largest window, so each grow makes room for one more;
* the container's ``/dev/shm`` (``docker run --shm-size``, a memory ``emptyDir`` in Kubernetes)
  must hold every region at its peak: each instance's start size, plus pe_llm's live windows and
  as many waiting for a slot, plus pe_rank's copies of them, plus headroom. A container's default
  64 MB is below that at hidden 4096.

:func:`plan_for_repository` reads the shape from an exported repository (pe_projector's
``projector.json`` and pe_llm's ``max_live_windows``); the embedded launcher passes
:func:`backend_config_args` to every Triton it starts, ``pe-rank export`` prints the ``/dev/shm``
size a repository needs, and deploy/ uses the sizes for hidden 4096.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
MAX_WINDOW = 100  # the largest window a request may ask for (pe_rank.core.validation.Limits)
PYTHON_INSTANCES = 5  # pe_tokenizer, pe_encoder, pe_projector, pe_llm, pe_rank (count 1 each)
HEADROOM = 64 * MIB


def _mib_ceil(size: int) -> int:
    return -(-size // MIB) * MIB


@dataclass(frozen=True)
class ShmPlan:
    window_bytes: int  # PASSAGE_EMBEDS of one largest window
    default_byte_size: int
    growth_byte_size: int
    total_bytes: int  # what /dev/shm must hold

    @property
    def total_mib(self) -> int:
        return self.total_bytes // MIB


def plan(hidden_size: int, max_live_windows: int = 64, max_window: int = MAX_WINDOW,
         instances: int = PYTHON_INSTANCES) -> ShmPlan:
    window = max_window * hidden_size * 4
    default = _mib_ceil(window) + MIB
    growth = max(MIB, _mib_ceil(window))
    # pe_llm: its live windows and as many waiting for a slot; pe_rank: its BLS copies of them
    peak_windows = 3 * max_live_windows * window
    total = _mib_ceil(instances * default + peak_windows + HEADROOM)
    return ShmPlan(window, default, growth, total)


def plan_for_repository(repository: Path) -> ShmPlan | None:
    """The plan for an exported repository, or None when it does not hold pe_projector's shape."""
    repository = Path(repository)
    try:
        hidden = int(json.loads((repository / "pe_projector" / "1" / "projector.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError):
        return None
    from .configs import LLM_MAX_LIVE_WINDOWS, read_config

    max_live = LLM_MAX_LIVE_WINDOWS
    try:
        parameters = read_config(repository / "pe_llm" / "config.pbtxt").parameters
        if "max_live_windows" in parameters:
            max_live = int(parameters["max_live_windows"].string_value)
    except (OSError, ValueError):
        pass
    return plan(hidden, max_live)


def backend_config_args(shm: ShmPlan) -> list[str]:
    return [f"--backend-config=python,shm-default-byte-size={shm.default_byte_size}",
            f"--backend-config=python,shm-growth-byte-size={shm.growth_byte_size}"]
