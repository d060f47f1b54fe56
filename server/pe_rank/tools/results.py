"""What every benchmark result file records: where it ran, from which commit, under which name."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path


def machine_info() -> dict[str, object]:
    """Where a number was measured; the load average shows whether the machine was shared."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import torch

    return {"platform": platform.platform(), "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_line(machine: dict) -> str:
    return (f"{machine['cpu']} ({machine['cores']} cores, load {machine.get('load_avg_1m', '?')} at the end), "
            f"GPU {machine.get('gpu') or 'none'}")


def result_stem(out: Path, label: str) -> Path:
    """``out/DATE-HOST-label``: the name every result file of one run starts with."""
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{time.strftime('%Y%m%d-%H%M%S')}-{platform.node() or 'host'}-{label}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
