"""Helpers shared by the Python-backend models in model_repository/ (one place, not five)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..core.errors import EngineUnavailable, InvalidRequest, WindowCancelled


def model_dir(args: dict[str, str]) -> Path:
    """The model's version folder (where export put its artefacts)."""
    return Path(args["model_repository"]) / args["model_version"]


def parameters(args: dict[str, str]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def device_of(args: dict[str, str]) -> str:
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


def respond_each(pb_utils: Any, requests: list, handle: Callable[[Any], list]) -> list:
    """One response per request; a failing request gets an error response, the others go on."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except Exception as exc:  # the error goes back to that caller; the model keeps serving
            responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)))
    return responses


def triton_error(pb_utils: Any, exc: BaseException):
    """Our exceptions (:mod:`pe_rank.core.errors`) as Triton errors with a code clients can act on.

    Only a caller's bad input is INVALID_ARG; a fault of ours (any other exception) is INTERNAL,
    never blamed on the caller.
    """
    if isinstance(exc, WindowCancelled):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.CANCELLED)
    if isinstance(exc, EngineUnavailable):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
    if isinstance(exc, InvalidRequest):  # bad shapes, a missing input, a query holding the placeholder text
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)


def input_array(pb_utils: Any, request: Any, name: str, required: bool = True):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidRequest(name, "this input is required")
        return None
    return tensor.as_numpy()


def cpu_threads(args: dict[str, str], key: str = "threads") -> int:
    """The model process's CPU threads from its config (0: the runtime's default); PyTorch's are set here.

    Each Triton model runs in a process of its own: left at the default, every one of them uses
    every core, and concurrent requests oversubscribe the machine.
    """
    threads = int(parameters(args).get(key, "0") or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    return threads


def onnx_session(path: Path, args: dict[str, str], threads: int = 0):
    """onnxruntime on the instance's device (CUDA provider first on a GPU instance)."""
    import onnxruntime as ort

    gpu = device_of(args) != "cpu"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)
