"""TensorRT engines from the exported ONNX (optimisation profiles, fp16 or fp32); needs a GPU.

An engine only loads in the TensorRT it was built with (no version-compatible flag here: that
needs the lean runtime in Triton). So the engines must be built with the TensorRT of the Triton
that serves them: build inside the same NGC container (deploy/triton.Dockerfile installs the
matching ``tensorrt`` wheel), and the exporter refuses a ``tensorrt`` module whose version differs
from the container's TensorRT runtime when it can see that runtime (:func:`runtime_version`).
Engines are also specific to the GPU architecture they were built on. ``tensorrt.json`` next to
each ``model.plan`` records the TensorRT version, the GPU and the precision.

Nothing here was run on a GPU by this project yet (see README, "Deploying on NGC Triton").
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .onnx_export import ExportError

MAX_SEQUENCE = 512
ENGINE_FP32_TOLERANCE = 1e-3  # TensorRT's fp32 kernels (TF32 off) against PyTorch on the CPU
ENGINE_FP16_TOLERANCE = 2e-2  # as the fp16 ONNX bound
# where the NGC containers (and Debian/Ubuntu TensorRT packages) keep libnvinfer
RUNTIME_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/local/tensorrt/lib",
                    "/opt/tensorrt/lib", "/usr/lib64")
_LIB = re.compile(r"libnvinfer\.so\.(\d+\.\d+\.\d+)")


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
        raise ExportError("target tensorrt needs the tensorrt package of the serving Triton's TensorRT: "
                          "pip install 'tensorrt-cu12==X.Y.Z' (see deploy/triton.Dockerfile)") from None
    check_runtime_match(trt.__version__, runtime_version())
    return trt


def _release(version: str) -> str:
    """'10.7.0.23' or '10.7.0.post1' -> '10.7.0': TensorRT engines are tied to this much of the version."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version.strip())
    if not match:
        raise ExportError(f"cannot read a TensorRT version from {version!r}")
    return ".".join(match.groups())


def runtime_version(lib_dirs: tuple[str, ...] = RUNTIME_LIB_DIRS, environ: dict | None = None) -> str | None:
    """The TensorRT runtime Triton would load on this machine, as X.Y.Z, or None when none is seen.

    The NGC images set ``TRT_VERSION``; otherwise the version is read from the name of the
    ``libnvinfer.so.X.Y.Z`` file in the system library folders (the pip wheel's own copy lives
    inside site-packages and is not looked at).
    """
    environ = os.environ if environ is None else environ
    if environ.get("TRT_VERSION"):
        return _release(environ["TRT_VERSION"])
    found = set()
    for folder in lib_dirs:
        for path in Path(folder).glob("libnvinfer.so.*"):
            match = _LIB.fullmatch(path.resolve().name)
            if match:
                found.add(match.group(1))
    if len(found) > 1:
        raise ExportError(f"several TensorRT runtimes are installed ({', '.join(sorted(found))}); set TRT_VERSION "
                          "to the one Triton loads")
    return found.pop() if found else None


def check_runtime_match(builder: str, runtime: str | None) -> None:
    """Refuse to build with a TensorRT whose engines the runtime here could not load."""
    if runtime is not None and _release(builder) != _release(runtime):
        raise ExportError(f"tensorrt {builder} would build engines that this container's TensorRT {runtime} cannot "
                          f"load: pip install 'tensorrt-cu12=={runtime}' (or build in the serving Triton's container)")


def build_engine(onnx_path: Path, plan_path: Path, profiles: dict[str, tuple[tuple, tuple, tuple]],
                 fp16: bool) -> None:
    """Parse ONNX and serialise an engine with one optimisation profile (min, opt, max per input).

    ``fp16``: TensorRT may run layers in fp16 (``--dtype fp16``); otherwise fp32 with TF32 off,
    so an fp32 engine keeps fp32 numerics. Inputs and outputs stay fp32/int64 either way.
    """
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
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path.write_bytes(bytes(engine))
    import torch

    plan_path.with_name("tensorrt.json").write_text(json.dumps({
        "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "precision": "fp16" if fp16 else "fp32"}, indent=1))


def encoder_profiles(max_batch: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    shape = ((1, 1), (min(16, max_batch), 256), (max_batch, MAX_SEQUENCE))
    return {"INPUT_IDS": shape, "ATTENTION_MASK": shape}


def projector_profiles(max_batch: int, embedding_size: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    return {"ENCODER_EMBEDDING": ((1, embedding_size), (min(16, max_batch), embedding_size), (max_batch, embedding_size))}


def run_engine(plan: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One execution of a serialized engine on the GPU (torch CUDA buffers); outputs as numpy."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    torch_types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
                   trt.int32: torch.int32}
    keep = []
    for name, array in feeds.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        keep.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch_types[engine.get_tensor_dtype(name)],
                              device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise ExportError(f"{plan}: TensorRT execution failed")
    stream.synchronize()
    return {name: out.float().cpu().numpy() for name, out in outputs.items()}


def check_engines(model, encoder_plan: Path, projector_plan: Path, max_batch: int, tolerance: float) -> dict[str, float]:
    """Max abs error of the engines against PyTorch (CPU, fp32) on the same real passages as the ONNX
    check; raises above ``tolerance``. Runs on the GPU the engines were built on."""
    from pe_rank.runtime.model import encode_in_batches

    from .onnx_export import sample_passages

    texts = sample_passages()
    tokens = model.tokenize_passages(texts)
    ref_enc = encode_in_batches(model.encoder, model.info.pooling, tokens["input_ids"], tokens["attention_mask"])
    ref_proj = model.project(ref_enc)
    step = min(16, max_batch)
    got_enc = np.concatenate([
        run_engine(encoder_plan, {"INPUT_IDS": tokens["input_ids"][i : i + step],
                                  "ATTENTION_MASK": tokens["attention_mask"][i : i + step]})["EMBEDDING"]
        for i in range(0, len(texts), step)])
    got_proj = np.concatenate([run_engine(projector_plan, {"ENCODER_EMBEDDING": ref_enc[i : i + max_batch]})["PROJECTED"]
                               for i in range(0, len(texts), max_batch)])
    errors = {"encoder": float(np.abs(got_enc - ref_enc).max()), "projector": float(np.abs(got_proj - ref_proj).max()),
              "passages": float(len(texts))}
    for part in ("encoder", "projector"):
        if not errors[part] <= tolerance:
            raise ExportError(f"{part} TensorRT engine differs from PyTorch by {errors[part]:.3g} (> {tolerance:g}); "
                              "export rejected")
    return errors
