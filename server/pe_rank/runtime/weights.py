"""Loading a checkpoint's weights (safetensors or .bin, single or sharded) into torch modules.

User mistakes (missing weights, wrong shapes) raise :class:`~pe_rank.core.checkpoint.CheckpointError`
with one line naming the file and the key.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..core.checkpoint import CheckpointError


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
