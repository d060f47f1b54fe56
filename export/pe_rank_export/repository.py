"""Turn a PE-Rank checkpoint into a Triton model repository for one target."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pe_rank.runtime.model import PeRankModel, load_model

from . import backend_rules, configs
from .onnx_export import FP16_TOLERANCE, FP32_TOLERANCE, ExportError, check_onnx, export_encoder, export_projector
from .runtime_io import RuntimeIO, onnxruntime_io, ordered, tensorrt_io
from .shm import backend_config_args, plan_for_repository

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
    """Write configs, model.py files and artefacts; returns the parity-check report.

    The ONNX and TensorRT targets' pe_encoder and pe_projector configs take their dims from the
    shapes the runtime reports for the exported models, and an export whose config the native
    backend would refuse (by its own load rules, :mod:`.backend_rules`) fails.
    """
    if options.dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype {options.dtype!r} is not fp32 or fp16")
    try:  # before any work: --target tensorrt --cpu is refused here, never written
        configs.check_target(options.target, True if options.gpu is None else options.gpu)
    except configs.ConfigError as exc:
        raise ExportError(str(exc)) from None
    gpu = _gpu_visible() if options.gpu is None else options.gpu
    if options.target == "tensorrt":
        from .tensorrt_build import require_tensorrt

        require_tensorrt()
    model = load_model(checkpoint, dtype="float32")
    repository.mkdir(parents=True, exist_ok=True)
    for name in configs.MODELS:
        (repository / name / "1").mkdir(parents=True, exist_ok=True)
    _copy_model_code(repository, options.target)
    _write_tokenizer(model, repository / "pe_tokenizer" / "1" / "tokenizer")
    report, runtime = _write_encoder_and_projector(model, repository, options, log)
    _write_llm(checkpoint, repository / "pe_llm" / "1", options.dtype)
    written = configs.all_configs(options.target, gpu, options.max_batch, options.step_batching,
                                  encoder_io=runtime["pe_encoder"].specs() if runtime else None,
                                  projector_io=runtime["pe_projector"].specs() if runtime else None)
    if runtime:
        _check_backend_rules(options.target, written, runtime)
    for name, config in written.items():
        configs.write_config(repository / name, config)
    log(f"wrote {options.target} repository to {repository} ({'GPU' if gpu else 'CPU'} instances)")
    shm = plan_for_repository(repository)
    if shm is not None:
        log(f"Triton's Python backend needs about {shm.total_mib} MiB of /dev/shm for this repository "
            f"(docker run --shm-size={shm.total_mib}m; {' '.join(backend_config_args(shm))})")
    return report


def _check_backend_rules(target: str, written: dict, runtime: dict[str, RuntimeIO]) -> None:
    """The native backend's own load rules on each config it would serve (python targets: none apply)."""
    rule = {"onnxruntime": backend_rules.onnxruntime_errors, "tensorrt": backend_rules.tensorrt_errors}.get(target)
    if rule is None:
        return
    for name, io in runtime.items():
        errors = rule(written[name], io)
        if errors:
            raise ExportError(f"{name}: Triton's {target} backend would refuse the config: {errors[0]}")


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


def _write_encoder_and_projector(model: PeRankModel, repository: Path, options: ExportOptions,
                                 log) -> tuple[dict, dict[str, RuntimeIO] | None]:
    """The encoder and projector artefacts; returns the parity report and, for the ONNX and TensorRT
    targets, each model's I/O as its runtime reports it (None for the torch target)."""
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
        return {"encoder": 0.0, "projector": 0.0}, None
    fp16 = options.dtype == "fp16"
    # TensorRT builds from the fp32 graph and lowers precision itself (--dtype sets its FP16 flag)
    onnx_fp16 = fp16 and options.target != "tensorrt"
    export_encoder(model, enc_dir / "model.onnx", fp16=onnx_fp16)
    export_projector(model, proj_dir / "model.onnx", fp16=onnx_fp16)
    report = check_onnx(model, enc_dir / "model.onnx", proj_dir / "model.onnx",
                        FP16_TOLERANCE if onnx_fp16 else FP32_TOLERANCE)
    log(f"ONNX vs PyTorch on {int(report['passages'])} passages: encoder max abs error {report['encoder']:.3g}, "
        f"projector {report['projector']:.3g}")
    if options.target != "tensorrt":
        return report, {"pe_encoder": ordered(onnxruntime_io(enc_dir / "model.onnx"), configs.ENCODER_IO),
                        "pe_projector": ordered(onnxruntime_io(proj_dir / "model.onnx"), configs.PROJECTOR_IO)}
    from .tensorrt_build import (ENGINE_FP16_TOLERANCE, ENGINE_FP32_TOLERANCE, build_engine, check_engines,
                                 encoder_profiles, projector_profiles)

    build_engine(enc_dir / "model.onnx", enc_dir / "model.plan", encoder_profiles(options.max_batch), fp16=fp16)
    build_engine(proj_dir / "model.onnx", proj_dir / "model.plan",
                 projector_profiles(options.max_batch, info.embedding_size), fp16=fp16)
    engines = check_engines(model, enc_dir / "model.plan", proj_dir / "model.plan", options.max_batch,
                            ENGINE_FP16_TOLERANCE if fp16 else ENGINE_FP32_TOLERANCE)
    log(f"built TensorRT engines ({options.dtype}); engines vs PyTorch on {int(engines['passages'])} passages: "
        f"encoder max abs error {engines['encoder']:.3g}, projector {engines['projector']:.3g}")
    report = {**report, "engine_encoder": engines["encoder"], "engine_projector": engines["projector"]}
    return report, {"pe_encoder": ordered(tensorrt_io(enc_dir / "model.plan"), configs.ENCODER_IO),
                    "pe_projector": ordered(tensorrt_io(proj_dir / "model.plan"), configs.PROJECTOR_IO)}


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
