"""The trained checkpoint folder: the input checkpoint hard-linked, plus the trained weights.

The projector goes to ``projector.safetensors`` (keys ``model.projector.*``), the
adapter-merged LLM layers of stage 3 to ``llm_layers.safetensors``, and a
``model.safetensors.index.json`` maps every other key to the input's weight files and the
trained keys to the new files, so :class:`pe_rank.core.checkpoint.WeightFiles` (and
everything that loads checkpoints here) reads the trained projector and the untouched
rest. Files this module rewrites are always replaced (write a temporary file, then
rename), never written in place, so the hard-linked input never changes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..core.checkpoint import PROJECTOR_PREFIX
from ..runtime.weights import WeightFiles

PROJECTOR_FILE = "projector.safetensors"
LLM_LAYERS_FILE = "llm_layers.safetensors"  # adapter-merged top layers (stage 3)
ADAPTER_DIR = "adapter"  # the PEFT LoRA adapter of stage 3, as trained
INDEX_FILE = "model.safetensors.index.json"
STATE_FILE = "train_state.pt"
CACHE_FILE = "encoder_cache.pt"
REPORT_FILE = "TRAINING.md"
NOT_COPIED = {STATE_FILE, CACHE_FILE}  # training scratch of an input that was itself trained


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_checkpoint(src: Path, out: Path) -> None:
    """Recreate ``src``'s tree under ``out`` with hard links (copies across file systems)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in NOT_COPIED or rel.name.endswith(".tmp"):
            continue
        target = out / rel
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif not target.exists():
            _link_or_copy(path, target)


def replace_file(path: Path, data: bytes | str) -> None:
    """Write ``path`` as a new file (new inode), so a hard link to the old one is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_projector(out: Path, projector: torch.nn.Module) -> None:
    """Save the projector and point the weight index at it."""
    write_weights(out, PROJECTOR_FILE, {PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()})


def write_weights(out: Path, file: str, state: dict[str, torch.Tensor]) -> None:
    """Store ``state`` in ``out/file`` and map its keys there in the weight index (others unchanged)."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    weight_map = {k: str(p.relative_to(out)) for k, p in WeightFiles(out).key_to_file.items()}
    weight_map = {k: f for k, f in weight_map.items() if f != file and k not in state}
    weight_map.update({k: file for k in state})
    replace_file(out / file, save(state, metadata={"format": "pt"}))
    overrides = sorted({f for f in weight_map.values() if f in (PROJECTOR_FILE, LLM_LAYERS_FILE)})
    index = {"metadata": {"pe_rank_training": f"trained weights come from {', '.join(overrides)}"},
             "weight_map": dict(sorted(weight_map.items()))}
    replace_file(out / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def record_in_config(out: Path, stage: int, summary: dict) -> None:
    """Note the training in config.json (``pe_rank_training``), keeping everything else."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    training = config.get("pe_rank_training") or {}
    training[f"stage{stage}"] = summary
    config["pe_rank_training"] = training
    replace_file(path, json.dumps(config, indent=2) + "\n")


def append_report(out: Path, section: str) -> None:
    path = out / REPORT_FILE
    old = path.read_text() if path.exists() else "# Training log\n\nOne section per `pe-rank train` stage run.\n"
    replace_file(path, old.rstrip("\n") + "\n\n" + section.strip("\n") + "\n")
