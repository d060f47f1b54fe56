"""Frozen encoder embeddings, computed once per text and kept on disk between runs.

The encoder never trains, so a text's pooled, L2-normalised embedding is fixed. Texts are
encoded lazily (only those a step needs), in length-sorted chunks so padding stays small,
with the model's own ``encode`` (same truncation, pooling and normalisation as ranking).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..runtime.model import PeRankModel

CHUNK = 32
PROBE_TEXT = "pe-rank training cache probe: the quick brown fox jumps over the lazy dog"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EmbeddingCache:
    """text -> encoder embedding [E] (float32); ``save`` persists it with an encoder probe."""

    def __init__(self, model: PeRankModel, path: Path | None = None) -> None:
        self.model = model
        self.path = path
        self._rows: dict[str, np.ndarray] = {}
        self._probe = model.encode([PROBE_TEXT])[0]
        self.encoded = 0  # texts encoded by this process (for progress lines)
        if path is not None and path.exists():
            self._load(path)

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, texts: list[str]) -> np.ndarray:
        """Embeddings [len(texts), E], encoding the texts not seen yet."""
        missing = list(dict.fromkeys(t for t in texts if text_key(t) not in self._rows))
        if missing:
            self._encode(missing)
        return np.stack([self._rows[text_key(t)] for t in texts])

    def _encode(self, texts: list[str]) -> None:
        lengths = [len(ids) for ids in self.model.encoder_tokenizer(texts, truncation=True, max_length=512)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        for start in range(0, len(order), CHUNK):
            chunk = [texts[i] for i in order[start:start + CHUNK]]
            for text, row in zip(chunk, self.model.encode(chunk)):
                self._rows[text_key(text)] = row.astype(np.float32)
        self.encoded += len(texts)

    def save(self) -> None:
        if self.path is None:
            return
        keys = sorted(self._rows)
        matrix = np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, len(self._probe)), np.float32)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"probe": torch.from_numpy(self._probe), "keys": keys, "rows": torch.from_numpy(matrix)}, tmp)
        os.replace(tmp, self.path)

    def _load(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        probe = saved["probe"].numpy()
        if probe.shape != self._probe.shape or not np.allclose(probe, self._probe, atol=1e-5):
            return  # another encoder wrote it: start afresh (the file is rewritten on save)
        self._rows = dict(zip(saved["keys"], saved["rows"].numpy()))
