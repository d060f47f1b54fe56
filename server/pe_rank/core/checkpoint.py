"""Loading released PE-Rank checkpoints (``embed_mistral`` / ``embed_llama``).

User mistakes (wrong folder, missing weights, wrong shapes) raise :class:`CheckpointError`
with one line naming the file and the key, so the CLI can print it without a traceback.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

LLM_TYPES = {"embed_mistral": "mistral", "embed_llama": "llama"}
POOLINGS = ("mean", "cls", "last_token")
PROJECTOR_PREFIX = "model.projector."
ENCODER_PREFIX = "model.encoder.encoder."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message says which file and key."""


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
    )


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


def build_projector(projector_type: str, embedding_size: int, hidden_size: int) -> nn.Module:
    """Same module layout as the released code, so state-dict keys line up."""
    if projector_type == "linear":
        return nn.Linear(embedding_size, hidden_size)
    if projector_type == "identity":
        return nn.Identity()
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", projector_type).group(1))  # type: ignore[union-attr]
    modules: list[nn.Module] = [nn.Linear(embedding_size, hidden_size)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*modules)


class WeightFiles:
    """Index of every tensor in a checkpoint folder: safetensors or .bin, single or sharded."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key_to_file: dict[str, Path] = {}
        for candidate in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / candidate
            if index.exists():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                self.key_to_file = {k: folder / f for k, f in weight_map.items()}
                break
        else:
            for candidate in ("model.safetensors", "pytorch_model.bin"):
                path = folder / candidate
                if path.exists():
                    self.key_to_file = {k: path for k in _keys_of(path)}
                    break
        if not self.key_to_file:
            raise CheckpointError(
                f"{folder}: no weights found (expected model.safetensors, pytorch_model.bin "
                "or a sharded *.index.json)"
            )
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.key_to_file if k.startswith(prefix)]

    def load(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor, Path]]:
        for key in keys:
            path = self.key_to_file[key]
            if not path.exists():
                raise CheckpointError(f"{path}: weight file is missing (needed for key {key!r})")
            yield key, self._tensor(path, key), path

    def _tensor(self, path: Path, key: str) -> torch.Tensor:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                if key not in handle.keys():
                    raise CheckpointError(f"{path}: key {key!r} listed in the index but absent")
                return handle.get_tensor(key)
        if path not in self._bin_cache:
            self._bin_cache[path] = torch.load(path, map_location="cpu", weights_only=True)
        return self._bin_cache[path][key]


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    return list(torch.load(path, map_location="cpu", weights_only=True).keys())


def load_into(
    module: nn.Module, weights: WeightFiles, prefix: str, what: str, dtype: torch.dtype
) -> None:
    """Copy every ``prefix``-ed tensor into ``module``; missing or mis-shaped keys are errors."""
    expected = module.state_dict()
    persistent = {k for k in expected if not k.endswith("rotary_emb.inv_freq")}
    found = {k[len(prefix) :]: k for k in weights.keys(prefix)}
    missing = sorted(persistent - set(found))
    if missing:
        raise CheckpointError(
            f"{weights.folder}: {what} weight {prefix + missing[0]!r} is missing "
            f"({len(missing)} {what} keys missing in all)"
        )
    state: dict[str, torch.Tensor] = {}
    for key, tensor, path in weights.load([found[k] for k in sorted(persistent)]):
        target = expected[key[len(prefix) :]]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: key {key!r} has shape {list(tensor.shape)}, the config implies "
                f"{list(target.shape)}"
            )
        state[key[len(prefix) :]] = tensor.to(dtype)
    module.load_state_dict(state, strict=False)
