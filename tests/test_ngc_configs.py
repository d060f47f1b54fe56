"""The NGC path's configs against the loaded models, by Triton's native backends' own rules.

No ONNX Runtime or TensorRT backend runs here (the Triton from the nvidia-pytriton wheel has only
the Python backend), so each backend's load check is restated in pe_rank_export.backend_rules from
its source (onnxruntime_backend ``CompareDimsSupported`` / ``ValidateInputs`` / ``ValidateOutputs``,
tensorrt_backend's ``CompareDimsSupported`` / ``ValidateDimension``), and applied here to what
onnxruntime reports for the exported models once loaded. The TensorRT rule is applied to engine
shapes written out by hand (no tensorrt and no GPU here).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from conftest import CONFORMANCE
from pe_rank_export import tensorrt_build
from pe_rank_export.backend_rules import onnxruntime_errors, tensorrt_errors
from pe_rank_export.configs import all_configs, encoder_config, projector_config, read_config
from pe_rank_export.onnx_export import ExportError
from pe_rank_export.runtime_io import RuntimeIO, RuntimeTensor, onnxruntime_io

# pe_encoder's and pe_projector's configs as `pe-rank export --target onnxruntime` wrote them before
# this check existed (every feature dim -1), for the test that the rule refuses them
LEGACY = {
    "pe_encoder": """name: "pe_encoder"
platform: "onnxruntime_onnx"
max_batch_size: 128
input [
  { name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ -1 ] }
]
output [
  { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ -1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 200 }
instance_group [ { count: 1 kind: KIND_GPU } ]
""",
    "pe_projector": """name: "pe_projector"
platform: "onnxruntime_onnx"
max_batch_size: 128
input [
  { name: "ENCODER_EMBEDDING" data_type: TYPE_FP32 dims: [ -1 ] }
]
output [
  { name: "PROJECTED" data_type: TYPE_FP32 dims: [ -1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 200 }
instance_group [ { count: 1 kind: KIND_GPU } ]
""",
}
NATIVE = ("pe_encoder", "pe_projector")


def export(repository: Path, *args: str, checkpoint: str = "tiny-b") -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "export", "--model", str(CONFORMANCE / checkpoint),
                           "--repository", str(repository), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def onnxruntime_repository(request, tmp_path_factory) -> tuple[str, Path]:
    repository = tmp_path_factory.mktemp(f"ort-{request.param}")
    export(repository, "--target", "onnxruntime", "--dtype", request.param)
    return request.param, repository


def test_every_exported_config_parses_as_triton_model_config(onnxruntime_repository):
    _, repository = onnxruntime_repository
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = read_config(path)  # text_format.Parse: an unknown field or bad enum value raises
        assert config.name == path.parent.name
    assert {p.parent.name for p in repository.glob("*/config.pbtxt")} == set(all_configs("torch", False))


def test_onnxruntime_configs_match_the_loaded_models_by_the_backends_rule(onnxruntime_repository):
    dtype, repository = onnxruntime_repository
    for name in NATIVE:
        config = read_config(repository / name / "config.pbtxt")
        io = onnxruntime_io(repository / name / "1" / "model.onnx")
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 128
        assert onnxruntime_errors(config, io) == [], (dtype, name)
        # the dims are the session's, batch dim dropped: fixed feature dims, dynamic sequence
        for item, tensor in zip([*config.input, *config.output], [*io.inputs, *io.outputs]):
            assert (item.name, list(item.dims)) == (tensor.name, list(tensor.shape[1:]))
    enc = read_config(repository / "pe_encoder" / "config.pbtxt")
    proj = read_config(repository / "pe_projector" / "config.pbtxt")
    hidden, embedding = 64, 32  # tiny-b
    assert [list(i.dims) for i in enc.input] == [[-1], [-1]] and list(enc.output[0].dims) == [embedding]
    assert list(proj.input[0].dims) == [embedding] and list(proj.output[0].dims) == [hidden]
    # fp16 keeps fp32 inputs and outputs (keep_io_types), and the config says so
    assert mc.DataType.Name(proj.output[0].data_type) == "TYPE_FP32"


def test_the_rule_refuses_the_configs_export_wrote_before(onnxruntime_repository):
    """Yesterday's `dims: [ -1 ]` on EMBEDDING and PROJECTED: ONNX Runtime's backend compares outputs exactly."""
    _, repository = onnxruntime_repository
    for name, output in (("pe_encoder", "EMBEDDING"), ("pe_projector", "PROJECTED")):
        legacy = text_format.Parse(LEGACY[name], mc.ModelConfig())
        errors = onnxruntime_errors(legacy, onnxruntime_io(repository / name / "1" / "model.onnx"))
        assert any(f"tensor '{output}': the model expects shape [-1, " in e for e in errors), errors
    # inputs too, where the model's dim is fixed: pe_projector's ENCODER_EMBEDDING (the encoder's inputs are
    # dynamic in the model, so -1 is right for them)
    legacy = text_format.Parse(LEGACY["pe_projector"], mc.ModelConfig())
    errors = onnxruntime_errors(legacy, onnxruntime_io(repository / "pe_projector" / "1" / "model.onnx"))
    assert len(errors) == 2 and "tensor 'ENCODER_EMBEDDING'" in errors[0]
    legacy = text_format.Parse(LEGACY["pe_encoder"], mc.ModelConfig())
    errors = onnxruntime_errors(legacy, onnxruntime_io(repository / "pe_encoder" / "1" / "model.onnx"))
    assert len(errors) == 1 and "tensor 'EMBEDDING'" in errors[0]


def test_onnxruntime_rule_details():
    """The rest of the ONNX Runtime backend's rule, on a session shape written out."""
    io = RuntimeIO((RuntimeTensor("X", mc.TYPE_FP32, (-1, 8)), RuntimeTensor("W", mc.TYPE_FP32, (-1, -1))),
                   (RuntimeTensor("Y", mc.TYPE_FP32, (-1, 4)),))
    good = encoder_config("onnxruntime", True, 16, ([_spec("X", [8]), _spec("W", [-1])], [_spec("Y", [4])]))
    good.name = "m"
    assert onnxruntime_errors(good, io) == []
    for change, message in (
        (lambda c: c.input[0].dims.__setitem__(0, 9), "tensor 'X': the model expects shape [-1, 8]"),
        # an input's config dim may differ from the model's only where the model's is dynamic
        (lambda c: c.input[0].dims.__setitem__(0, -1), "tensor 'X': the model expects shape [-1, 8]"),
        (lambda c: c.input[1].dims.__setitem__(0, 5), None),
        (lambda c: c.output[0].dims.__setitem__(0, -1), "tensor 'Y': the model expects shape [-1, 4]"),
        (lambda c: setattr(c.output[0], "data_type", mc.TYPE_FP16), "expects datatype TYPE_FP16 for output 'Y'"),
        (lambda c: c.input.add(name="Z", data_type=mc.TYPE_FP32, dims=[1]), "configuration expects 3 inputs"),
        (lambda c: setattr(c.input[0], "optional", True), "optional input 'X' is not supported"),
    ):
        config = mc.ModelConfig()
        config.CopyFrom(good)
        change(config)
        errors = onnxruntime_errors(config, io)
        assert (errors == []) if message is None else any(message in e for e in errors), (message, errors)
    fixed_batch = RuntimeIO((RuntimeTensor("X", mc.TYPE_FP32, (2, 8)),), io.outputs)
    assert any("first dimension must be -1" in e for e in onnxruntime_errors(good, fixed_batch))


def _spec(name, dims):
    from pe_rank_export.configs import TensorSpec

    return TensorSpec(name, mc.TYPE_FP32, tuple(dims))


# ---- TensorRT: the rule on engine shapes as TensorRT reports them for our profiles (no engine built here)

def _engine_io(max_batch: int = 128, embedding: int = 32, hidden: int = 64) -> dict[str, RuntimeIO]:
    enc = tensorrt_build.encoder_profiles(max_batch)
    proj = tensorrt_build.projector_profiles(max_batch, embedding)
    return {
        "pe_encoder": RuntimeIO((RuntimeTensor("INPUT_IDS", mc.TYPE_INT64, (-1, -1)),
                                 RuntimeTensor("ATTENTION_MASK", mc.TYPE_INT64, (-1, -1))),
                                (RuntimeTensor("EMBEDDING", mc.TYPE_FP32, (-1, embedding)),), enc),
        "pe_projector": RuntimeIO((RuntimeTensor("ENCODER_EMBEDDING", mc.TYPE_FP32, (-1, embedding)),),
                                  (RuntimeTensor("PROJECTED", mc.TYPE_FP32, (-1, hidden)),), proj),
    }


def test_tensorrt_configs_from_engine_shapes_pass_the_backends_rule_and_the_profile():
    engines = _engine_io()
    configs = {"pe_encoder": encoder_config("tensorrt", True, 128, engines["pe_encoder"].specs()),
               "pe_projector": projector_config("tensorrt", True, 128, engines["pe_projector"].specs())}
    for name, config in configs.items():
        assert config.platform == "tensorrt_plan"
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert tensorrt_errors(config, engines[name]) == [], name
    # a max_batch_size past the profile's largest batch: batches the dynamic batcher forms would fail
    small = _engine_io(max_batch=64)
    assert any("exceeds the profile's largest batch 64" in e for e in tensorrt_errors(configs["pe_projector"],
                                                                                   small["pe_projector"]))
    # non-exact rule: a -1 in the config where the engine is fixed is fine, a different fixed dim is not
    loose = projector_config("tensorrt", True, 128, engines["pe_projector"].specs())
    loose.output[0].dims[0] = -1
    assert tensorrt_errors(loose, engines["pe_projector"]) == []
    loose.output[0].dims[0] = 65
    assert any("tensor 'PROJECTED'" in e for e in tensorrt_errors(loose, engines["pe_projector"]))
    # an input dim outside the profile
    long = encoder_config("tensorrt", True, 128, engines["pe_encoder"].specs())
    long.input[0].dims[0] = 1024
    assert any("the profile allows 1 to 512" in e for e in tensorrt_errors(long, engines["pe_encoder"]))
    # KIND_CPU: refused by the backend, and never written by the exporter
    cpu = mc.ModelConfig()
    cpu.CopyFrom(configs["pe_projector"])
    cpu.instance_group[0].kind = mc.ModelInstanceGroup.KIND_CPU
    assert any("supports only GPU" in e for e in tensorrt_errors(cpu, engines["pe_projector"]))
    with pytest.raises(ValueError, match="needs GPU instances"):
        all_configs("tensorrt", gpu=False)


def test_tensorrt_is_pinned_to_the_runtime_it_will_be_served_by(tmp_path):
    """The container's TensorRT is read from TRT_VERSION or libnvinfer's file name; a mismatch is refused."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libnvinfer.so.10.7.0").write_bytes(b"")
    (lib / "libnvinfer.so.10").symlink_to("libnvinfer.so.10.7.0")
    assert tensorrt_build.runtime_version((str(lib),), environ={}) == "10.7.0"
    assert tensorrt_build.runtime_version((str(lib),), environ={"TRT_VERSION": "10.8.0.43"}) == "10.8.0"
    assert tensorrt_build.runtime_version((str(tmp_path / "none"),), environ={}) is None
    tensorrt_build.check_runtime_match("10.7.0.post1", "10.7.0")
    tensorrt_build.check_runtime_match("10.9.0", None)  # no runtime seen: nothing to compare with
    with pytest.raises(ExportError, match=r"tensorrt 10\.9\.0 would build engines that this container's TensorRT "
                                          r"10\.7\.0 cannot load"):
        tensorrt_build.check_runtime_match("10.9.0", "10.7.0")
    (lib / "libnvinfer.so.10.8.0").write_bytes(b"")
    with pytest.raises(ExportError, match="several TensorRT runtimes"):
        tensorrt_build.runtime_version((str(lib),), environ={})
