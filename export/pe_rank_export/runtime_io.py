"""An exported model's inputs and outputs as its runtime reports them once it has loaded the model.

Triton's native backends compare a config with what their runtime says about the loaded model,
not with the ONNX file: ONNX Runtime may fix a dim the file marks symbolic (pe_encoder's
EMBEDDING is ``[batch, E]`` in the session), and TensorRT reports the engine's shapes and the
optimisation profile's range. So the exporter writes each config from these shapes.

A shape here is the full shape, batch dim first; ``-1`` is a dynamic dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from .configs import TensorSpec

_ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(int64)": "TYPE_INT64",
              "tensor(int32)": "TYPE_INT32", "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING"}


@dataclass(frozen=True)
class RuntimeTensor:
    name: str
    data_type: int  # model_config_pb2.DataType
    shape: tuple[int, ...]  # full shape as the runtime reports it; -1 = dynamic


@dataclass(frozen=True)
class RuntimeIO:
    inputs: tuple[RuntimeTensor, ...]
    outputs: tuple[RuntimeTensor, ...]
    # TensorRT only: input name -> (min, opt, max) full shapes of the optimisation profile
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None

    def specs(self, batching: bool = True) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Config inputs and outputs: the runtime's shapes less the batch dim when the config batches."""
        def one(t: RuntimeTensor) -> TensorSpec:
            return TensorSpec(t.name, t.data_type, t.shape[1:] if batching else t.shape)

        return [one(t) for t in self.inputs], [one(t) for t in self.outputs]


def _ort_dim(dim) -> int:
    # onnxruntime reports a fixed dim as an int and a symbolic or unknown one as a str or None
    return int(dim) if isinstance(dim, int) and dim >= 0 else -1


def onnxruntime_io(path: Path, providers: list[str] | None = None) -> RuntimeIO:
    """The I/O of an ONNX model as an onnxruntime InferenceSession reports it after loading."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])

    def tensors(args) -> tuple[RuntimeTensor, ...]:
        out = []
        for arg in args:
            if arg.type not in _ORT_TYPES:
                raise ValueError(f"{path}: {arg.name} has type {arg.type}, which the exporter does not map")
            out.append(RuntimeTensor(arg.name, mc.DataType.Value(_ORT_TYPES[arg.type]),
                                     tuple(_ort_dim(d) for d in arg.shape)))
        return tuple(out)

    return RuntimeIO(tensors(session.get_inputs()), tensors(session.get_outputs()))


def tensorrt_io(plan: Path) -> RuntimeIO:
    """The I/O of a serialized TensorRT engine and its first optimisation profile (needs tensorrt)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise ValueError(f"{plan}: TensorRT could not deserialize the engine")
    types = {trt.float32: "TYPE_FP32", trt.float16: "TYPE_FP16", trt.int64: "TYPE_INT64", trt.int32: "TYPE_INT32",
             trt.bool: "TYPE_BOOL"}
    inputs, outputs, profile = [], [], {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        tensor = RuntimeTensor(name, mc.DataType.Value(types[engine.get_tensor_dtype(name)]),
                               tuple(int(d) for d in engine.get_tensor_shape(name)))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append(tensor)
            low, opt, high = engine.get_tensor_profile_shape(name, 0)
            profile[name] = (tuple(low), tuple(opt), tuple(high))
        else:
            outputs.append(tensor)
    return RuntimeIO(tuple(inputs), tuple(outputs), profile)


def ordered(io: RuntimeIO, names: tuple[list[TensorSpec], list[TensorSpec]]) -> RuntimeIO:
    """``io`` with its tensors in the order of the model's interface (the config reads the same every export)."""
    def order(tensors, specs):
        rank = {s.name: i for i, s in enumerate(specs)}
        return tuple(sorted(tensors, key=lambda t: rank.get(t.name, len(rank))))

    return RuntimeIO(order(io.inputs, names[0]), order(io.outputs, names[1]), io.profile)
