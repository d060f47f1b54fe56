"""Encoder (with pooling and L2 norm in the graph) and projector to ONNX, checked against PyTorch."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pe_rank.runtime.model import PeRankModel, encode_in_batches, pool

OPSET = 17
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 2e-2  # fp16 has ~3 significant digits; unit-norm inputs, projector outputs O(1)


class ExportError(RuntimeError):
    """An export that must not be used (failed check, missing GPU, ...); one-line message."""


class PooledEncoder(nn.Module):
    """input_ids, attention_mask -> pooled, L2-normalised embedding, as one graph."""

    def __init__(self, encoder: nn.Module, pooling: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return nn.functional.normalize(pool(hidden, attention_mask, self.pooling).float(), p=2, dim=-1)


def sample_passages() -> list[str]:
    """Real DL19 passages shipped with the package, plus one over 512 encoder tokens."""
    data = json.loads(resources.files("pe_rank_export").joinpath("data/sample_passages.json").read_text())
    return data["passages"] + ["flea life cycle " * 400]


def to_fp16(path: Path) -> None:
    """fp16 weights and compute, fp32 inputs/outputs (onnxruntime's own converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(path))


def export_encoder(model: PeRankModel, path: Path, fp16: bool = False) -> None:
    wrapper = PooledEncoder(model.encoder, model.info.pooling).eval()
    sample = model.tokenize_passages(["a short passage", "another passage that is a bit longer"])
    args = (torch.from_numpy(sample["input_ids"]), torch.from_numpy(sample["attention_mask"]))
    torch.onnx.export(
        wrapper, args, str(path), input_names=["INPUT_IDS", "ATTENTION_MASK"], output_names=["EMBEDDING"],
        dynamic_axes={"INPUT_IDS": {0: "batch", 1: "sequence"}, "ATTENTION_MASK": {0: "batch", 1: "sequence"},
                      "EMBEDDING": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )
    if fp16:
        to_fp16(path)


def export_projector(model: PeRankModel, path: Path, fp16: bool = False) -> None:
    torch.onnx.export(
        model.projector.float().eval(), (torch.zeros(2, model.embedding_size),), str(path),
        input_names=["ENCODER_EMBEDDING"], output_names=["PROJECTED"],
        dynamic_axes={"ENCODER_EMBEDDING": {0: "batch"}, "PROJECTED": {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )
    if fp16:
        to_fp16(path)


def check_onnx(model: PeRankModel, encoder_path: Path, projector_path: Path, tolerance: float) -> dict[str, float]:
    """Max abs error of the ONNX graphs against PyTorch on real passages; raises above tolerance."""
    import onnxruntime as ort

    texts = sample_passages()
    tokens = model.tokenize_passages(texts)
    ref_enc = encode_in_batches(model.encoder, model.info.pooling, tokens["input_ids"], tokens["attention_mask"])
    ref_proj = model.project(ref_enc)
    enc = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    proj = ort.InferenceSession(str(projector_path), providers=["CPUExecutionProvider"])
    got_enc = np.concatenate([
        enc.run(None, {"INPUT_IDS": tokens["input_ids"][i : i + 16], "ATTENTION_MASK": tokens["attention_mask"][i : i + 16]})[0]
        for i in range(0, len(texts), 16)
    ])
    got_proj = proj.run(None, {"ENCODER_EMBEDDING": ref_enc})[0]
    errors = {"encoder": float(np.abs(got_enc - ref_enc).max()), "projector": float(np.abs(got_proj - ref_proj).max()),
              "passages": float(len(texts))}
    for part in ("encoder", "projector"):
        if not errors[part] <= tolerance:
            raise ExportError(f"{part} ONNX differs from PyTorch by {errors[part]:.3g} (> {tolerance:g}); export rejected")
    return errors
