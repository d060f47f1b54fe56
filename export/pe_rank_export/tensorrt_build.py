"""TensorRT engines from the exported ONNX (fp16, optimisation profiles); needs a GPU."""
from __future__ import annotations

from pathlib import Path

from .onnx_export import ExportError

MAX_SEQUENCE = 512


def require_tensorrt():
    """The tensorrt module, or ExportError saying what is missing."""
    try:
        import torch

        if not torch.cuda.is_available():
            raise ExportError("target tensorrt needs an NVIDIA GPU; none is visible (torch.cuda.is_available() is False)")
    except ImportError:  # pragma: no cover - torch is a dependency
        raise ExportError("target tensorrt needs torch with CUDA") from None
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("target tensorrt needs the tensorrt package: pip install '.[tensorrt]'") from None
    return trt


def build_engine(onnx_path: Path, plan_path: Path, profiles: dict[str, tuple[tuple, tuple, tuple]], fp16: bool = True) -> None:
    """Parse ONNX and serialise an engine with one optimisation profile (min, opt, max per input)."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{onnx_path}: TensorRT could not parse it: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path.write_bytes(bytes(engine))


def encoder_profiles(max_batch: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    shape = ((1, 1), (min(16, max_batch), 256), (max_batch, MAX_SEQUENCE))
    return {"INPUT_IDS": shape, "ATTENTION_MASK": shape}


def projector_profiles(max_batch: int, embedding_size: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    return {"ENCODER_EMBEDDING": ((1, embedding_size), (min(16, max_batch), embedding_size), (max_batch, embedding_size))}
