"""The checks Triton's native backends make when they load a model, restated for one config.

Read from Triton's sources (main branch, 2026):

* onnxruntime_backend ``src/onnxruntime.cc`` ``ValidateInputs`` / ``ValidateOutputs`` with
  ``src/onnxruntime_utils.cc`` ``CompareDimsSupported``: the config's inputs must be exactly the
  session's inputs (count and names), data types equal; with ``max_batch_size > 0`` every model
  shape must start with a dynamic (-1) dim and optional inputs are refused. Inputs are compared
  with ``compare_exact=false``: a config dim may differ from the model's only where the model's
  is -1. Outputs with ``compare_exact=true``: every dim equal, -1 included.
* tensorrt_backend ``src/instance_state.cc`` (``InitializeExecuteInputBinding``, output binding,
  ``ConfigureInputDimensions``) with ``src/tensorrt_utils.cc`` ``CompareDimsSupported`` and
  ``ValidateDimension``: KIND_GPU only; data types equal; dims compared where *both* the engine's
  and the config's dim are fixed (non-exact, for inputs and outputs); an input's config dims must
  lie inside the optimisation profile's [min, max]. Beyond what the backend checks at load, a
  batch the dynamic batcher may form (up to ``max_batch_size``) must fit the profile's batch range,
  or those requests fail at run time: the profile's min batch must be 1 and its max at least
  ``max_batch_size``.

Each function returns the reasons the backend would refuse the model (empty: it loads).
"""
from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from .runtime_io import RuntimeIO, RuntimeTensor


def _type(data_type: int) -> str:
    return mc.DataType.Name(data_type)


def _dims_ok(model: tuple[int, ...], config: list[int], max_batch: int, exact: bool, both_fixed: bool) -> bool:
    full = ([-1] if max_batch > 0 else []) + list(config)
    if len(model) != len(full):
        return False
    for m, c in zip(model, full):
        compared = exact or (m != -1 and (c != -1 or not both_fixed))
        if compared and m != c:
            return False
    return True


def _shape_error(name: str, tensor: str, model: tuple[int, ...], config: list[int], max_batch: int) -> str:
    full = ([-1] if max_batch > 0 else []) + list(config)
    return (f"model '{name}', tensor '{tensor}': the model expects shape {list(model)} but the model "
            f"configuration specifies {full}" + (" (an initial batch dim because max_batch_size > 0)"
                                                 if max_batch > 0 else ""))


def onnxruntime_errors(config: mc.ModelConfig, io: RuntimeIO) -> list[str]:
    """Why Triton's ONNX Runtime backend would refuse ``config`` for a session reporting ``io``."""
    name, max_batch, errors = config.name, config.max_batch_size, []
    if config.platform != "onnxruntime_onnx" and config.backend != "onnxruntime":
        errors.append(f"model '{name}': platform is {config.platform or config.backend!r}, not onnxruntime_onnx")
    if len(config.input) != len(io.inputs):
        errors.append(f"unable to load model '{name}', configuration expects {len(config.input)} inputs, "
                      f"model provides {len(io.inputs)}")
    _io_errors(name, max_batch, config.input, io.inputs, "input", exact=False, both_fixed=False,
               batch_first_dynamic=True, errors=errors)
    _io_errors(name, max_batch, config.output, io.outputs, "output", exact=True, both_fixed=False,
               batch_first_dynamic=True, errors=errors)
    for item in config.input:
        if item.optional and max_batch != 0:
            errors.append(f"unable to load model '{name}', optional input '{item.name}' is not supported for "
                          "models that support batching")
    return errors


def tensorrt_errors(config: mc.ModelConfig, io: RuntimeIO) -> list[str]:
    """Why Triton's TensorRT backend would refuse ``config`` for an engine reporting ``io``, or why
    batches the config allows would fail against the engine's optimisation profile."""
    name, max_batch, errors = config.name, config.max_batch_size, []
    if config.platform != "tensorrt_plan" and config.backend != "tensorrt":
        errors.append(f"model '{name}': platform is {config.platform or config.backend!r}, not tensorrt_plan")
    for group in config.instance_group:
        if group.kind != mc.ModelInstanceGroup.KIND_GPU:
            errors.append(f"model '{name}': instance group kind {mc.ModelInstanceGroup.Kind.Name(group.kind)}: "
                          "TensorRT backend supports only GPU device")
    _io_errors(name, max_batch, config.input, io.inputs, "input", exact=False, both_fixed=True,
               batch_first_dynamic=False, errors=errors)
    _io_errors(name, max_batch, config.output, io.outputs, "output", exact=False, both_fixed=True,
               batch_first_dynamic=False, errors=errors)
    profile = io.profile or {}
    for item in config.input:
        if item.name not in profile:
            errors.append(f"model '{name}', input '{item.name}': no optimisation profile shape")
            continue
        low, _, high = profile[item.name]
        full = ([-1] if max_batch > 0 else []) + list(item.dims)
        if len(full) != len(high):
            continue  # reported above as a rank mismatch
        for axis, (dim, lo, hi) in enumerate(zip(full, low, high)):
            if dim != -1 and not lo <= dim <= hi:
                errors.append(f"model configuration specified invalid shape for input '{item.name}' for model "
                              f"{name}: dimension {axis} is {dim}, the profile allows {lo} to {hi}")
        if max_batch > 0:
            if low[0] > 1:
                errors.append(f"model '{name}', input '{item.name}': the profile's smallest batch is {low[0]}, so a "
                              "request of one item fails")
            if high[0] < max_batch:
                errors.append(f"model '{name}', input '{item.name}': max_batch_size {max_batch} exceeds the "
                              f"profile's largest batch {high[0]}")
    return errors


def _io_errors(name: str, max_batch: int, items, tensors: tuple[RuntimeTensor, ...], kind: str, exact: bool,
               both_fixed: bool, batch_first_dynamic: bool, errors: list[str]) -> None:
    by_name = {t.name: t for t in tensors}
    for item in items:
        tensor = by_name.get(item.name)
        if tensor is None:
            errors.append(f"model '{name}': configuration {kind} '{item.name}' is not a model {kind} "
                          f"(model {kind}s: {sorted(by_name)})")
            continue
        if item.data_type != tensor.data_type:
            errors.append(f"unable to load model '{name}', configuration expects datatype {_type(item.data_type)} "
                          f"for {kind} '{item.name}', model provides {_type(tensor.data_type)}")
        if batch_first_dynamic and max_batch > 0 and (not tensor.shape or tensor.shape[0] != -1):
            errors.append(f"model '{name}', tensor '{item.name}': for the model to support batching the shape "
                          f"should have at least 1 dimension and the first dimension must be -1; but shape "
                          f"expected by the model is {list(tensor.shape)}")
            continue
        if not tensor.shape:
            continue  # a scalar: the backends compare nothing but 1s, which our configs never declare
        if not _dims_ok(tensor.shape, list(item.dims), max_batch, exact, both_fixed):
            errors.append(_shape_error(name, item.name, tensor.shape, list(item.dims), max_batch))
