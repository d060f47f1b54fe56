"""Reading released PE-Rank checkpoints (``embed_mistral`` / ``embed_llama``): config and layout, no weights.

Torch-free, so the server can read a repository's checkpoint without PyTorch; loading the
weights is :mod:`pe_rank.runtime.weights`.

User mistakes (wrong folder, missing weights, wrong shapes) raise :class:`CheckpointError`
with one line naming the file and the key, so the CLI can print it without a traceback.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


LLM_TYPES = {"embed_mistral": "mistral", "embed_llama": "llama"}
POOLINGS = ("mean", "cls", "last_token")
PROJECTOR_PREFIX = "model.projector."
ENCODER_PREFIX = "model.encoder.encoder."


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used as it is; the message says which file and key."""


DEFAULTS_FILE = "ranking.json"


@dataclass(frozen=True)
class RankingDefaults:
    """What a request that does not say gets, for this model (``ranking.json`` beside config.json).

    A cascade: ``prerank`` orders the candidates by the encoder's query-passage cosine, then PE-Rank
    reorders only the top ``depth`` (0: every passage). Without the file: the paper's setting,
    no pre-rank, every passage.
    """

    prerank: bool = False
    depth: int = 0


@dataclass(frozen=True)
class CheckpointInfo:
    folder: Path
    config: dict[str, Any]
    llm_type: str
    encoder_dir: Path
    pooling: str
    projector_type: str
    embedding_size: int
    hidden_size: int
    defaults: RankingDefaults = RankingDefaults()


def read_checkpoint_info(folder: Path | str) -> CheckpointInfo:
    """Validate config.json and resolve the encoder folder, without loading weights."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if not config_path.exists():
        raise CheckpointError(f"{config_path}: missing (not a PE-Rank checkpoint folder)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    model_type = config.get("model_type")
    if model_type not in LLM_TYPES:
        raise CheckpointError(
            f"{config_path}: model_type is {model_type!r}, expected one of {sorted(LLM_TYPES)} "
            "(not a PE-Rank checkpoint)"
        )
    for key in ("hidden_size", "embedding_size", "encoder_name"):
        if key not in config:
            raise CheckpointError(f"{config_path}: key {key!r} is missing")
    pooling = config.get("encoder_pooling", "mean")
    if pooling not in POOLINGS:
        raise CheckpointError(f"{config_path}: encoder_pooling {pooling!r} not in {POOLINGS}")
    projector_type = config.get("projector_type", "linear")
    _check_projector_type(config_path, projector_type, config)
    encoder_dir = Path(config["encoder_name"])
    if not encoder_dir.is_absolute():
        encoder_dir = folder / encoder_dir
    if not (encoder_dir / "config.json").exists():
        raise CheckpointError(
            f"{config_path}: encoder_name {config['encoder_name']!r} does not name a local encoder "
            f"folder with a config.json (looked in {encoder_dir}); models are never downloaded"
        )
    return CheckpointInfo(
        folder=folder,
        config=config,
        llm_type=LLM_TYPES[model_type],
        encoder_dir=encoder_dir,
        pooling=pooling,
        projector_type=projector_type,
        embedding_size=int(config["embedding_size"]),
        hidden_size=int(config["hidden_size"]),
        defaults=read_ranking_defaults(folder),
    )


def read_ranking_defaults(folder: Path) -> RankingDefaults:
    """The checkpoint's ``ranking.json``; a key or value it does not know is a one-line error."""
    path = folder / DEFAULTS_FILE
    if not path.exists():
        return RankingDefaults()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict) or set(raw) - {"prerank", "depth"}:
        raise CheckpointError(f"{path}: expected an object with only 'prerank' (true/false) and 'depth' (>= 0)")
    prerank, depth = raw.get("prerank", False), raw.get("depth", 0)
    if not isinstance(prerank, bool) or not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise CheckpointError(f"{path}: 'prerank' must be true or false and 'depth' an integer >= 0")
    return RankingDefaults(prerank=prerank, depth=depth)


def _check_projector_type(config_path: Path, projector_type: str, config: dict) -> None:
    if projector_type in ("linear", "identity") or re.fullmatch(r"mlp(\d+)x_gelu", projector_type):
        if projector_type == "identity" and config["embedding_size"] != config["hidden_size"]:
            raise CheckpointError(
                f"{config_path}: identity projector needs embedding_size == hidden_size "
                f"({config['embedding_size']} != {config['hidden_size']})"
            )
        return
    raise CheckpointError(
        f"{config_path}: projector_type {projector_type!r} is not linear, identity or mlpNx_gelu"
    )
