"""Turn a PE-Rank checkpoint into a Triton model repository for one target."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pe_rank.runtime.model import PeRankModel, load_model

from . import configs
from .onnx_export import FP16_TOLERANCE, FP32_TOLERANCE, ExportError, check_onnx, export_encoder, export_projector

PYTHON_MODELS = ("pe_tokenizer", "pe_encoder", "pe_projector", "pe_llm", "pe_rank")
SOURCE_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@dataclass(frozen=True)
class ExportOptions:
    target: str = "torch"
    dtype: str = "fp32"
    max_batch: int = configs.MAX_BATCH
    gpu: bool | None = None  # None: use a GPU when one is visible
    step_batching: bool = True  # pe_llm batches the decode steps of concurrent windows


def export_repository(checkpoint: Path, repository: Path, options: ExportOptions, log=print) -> dict:
    """Write configs, model.py files and artefacts; returns the parity-check report."""
    if options.target not in configs.TARGETS:
        raise ExportError(f"target {options.target!r} is not one of {configs.TARGETS}")
    if options.dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype {options.dtype!r} is not fp32 or fp16")
    gpu = _gpu_visible() if options.gpu is None else options.gpu
    if options.target == "tensorrt":
        from .tensorrt_build import require_tensorrt

        require_tensorrt()
    model = load_model(checkpoint, dtype="float32")
    repository.mkdir(parents=True, exist_ok=True)
    for name, text in configs.all_configs(options.target, gpu, options.max_batch,
                                              options.step_batching).items():
        version = repository / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (repository / name / "config.pbtxt").write_text(text)
    _copy_model_code(repository, options.target)
    _write_tokenizer(model, repository / "pe_tokenizer" / "1" / "tokenizer")
    report = _write_encoder_and_projector(model, repository, options, log)
    _write_llm(checkpoint, repository / "pe_llm" / "1", options.dtype)
    log(f"wrote {options.target} repository to {repository} ({'GPU' if gpu else 'CPU'} instances)")
    return report


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _copy_model_code(repository: Path, target: str) -> None:
    if not SOURCE_REPOSITORY.is_dir():
        raise ExportError(f"{SOURCE_REPOSITORY}: model sources not found (install the project from its repository)")
    python_models = PYTHON_MODELS if target in ("torch", "python") else ("pe_tokenizer", "pe_llm", "pe_rank")
    for name in python_models:
        src = SOURCE_REPOSITORY / name / "1" / "model.py"
        dst = repository / name / "1" / "model.py"
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)


def _write_tokenizer(model: PeRankModel, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.encoder_tokenizer.save_pretrained(str(folder))


def _write_encoder_and_projector(model: PeRankModel, repository: Path, options: ExportOptions, log) -> dict:
    enc_dir, proj_dir = repository / "pe_encoder" / "1", repository / "pe_projector" / "1"
    info = model.info
    (proj_dir / "projector.json").write_text(json.dumps({
        "projector_type": info.projector_type, "embedding_size": info.embedding_size,
        "hidden_size": info.hidden_size, "dtype": "float16" if options.dtype == "fp16" else "float32"}))
    if options.target == "torch":
        from safetensors.torch import save_file

        shutil.rmtree(enc_dir / "encoder", ignore_errors=True)
        model.encoder.save_pretrained(str(enc_dir / "encoder"))
        (enc_dir / "encoder" / "pe_rank.json").write_text(json.dumps({"pooling": info.pooling}))
        save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(proj_dir / "projector.safetensors"))
        log("torch target: encoder and projector run in PyTorch with the reference's numerics (no parity loss)")
        return {"encoder": 0.0, "projector": 0.0}
    fp16 = options.dtype == "fp16"
    export_encoder(model, enc_dir / "model.onnx", fp16=fp16)
    export_projector(model, proj_dir / "model.onnx", fp16=fp16)
    report = check_onnx(model, enc_dir / "model.onnx", proj_dir / "model.onnx", FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    log(f"ONNX vs PyTorch on {int(report['passages'])} passages: encoder max abs error {report['encoder']:.3g}, "
        f"projector {report['projector']:.3g}")
    if options.target == "tensorrt":
        from .tensorrt_build import build_engine, encoder_profiles, projector_profiles

        build_engine(enc_dir / "model.onnx", enc_dir / "model.plan", encoder_profiles(options.max_batch))
        build_engine(proj_dir / "model.onnx", proj_dir / "model.plan",
                     projector_profiles(options.max_batch, info.embedding_size))
        log("built TensorRT engines (fp16)")
    return report


def _write_llm(checkpoint: Path, version: Path, dtype: str) -> None:
    """A self-contained copy of the checkpoint (hard links where the filesystem allows)."""
    target = version / "checkpoint"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(checkpoint, target, copy_function=_link_or_copy)
    (version / "pe_llm.json").write_text(json.dumps({"dtype": "float16" if dtype == "fp16" else "float32"}))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
