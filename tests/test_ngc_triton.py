"""On a real Triton (the nvidia-pytriton wheel's 2.51, CPU, Python backend): what the Python models
rely on when they run in an NGC container.

* Each Python model refuses, in ``initialize``, a config it cannot serve, with a one-line reason
  (Triton's repository index reports it as the model's load failure).
* pe_rank's BLS calls ask for their outputs in CPU memory. This Triton has no GPU, so no output
  can be in GPU memory here, and the stub gives no getter for a request's ``preferred_memory``:
  a probe model runs the real BLS code (pe_rank.triton_backend.bls) against the real pe_embed and
  pe_llm through a pb_utils that records each ``InferenceRequest`` and ``PreferredMemory`` it
  builds and forwards to the real ones. What it proves: every BLS request is built with
  ``preferred_memory=PreferredMemory(TRITONSERVER_MEMORY_CPU, 0)``, the stub accepts it, and the
  results are unchanged. What it cannot prove: the copy from GPU memory itself (see README).
* The embedded launcher sizes the Python backend's shared memory from the repository's window shape.
"""
from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tclient
from tritonclient.grpc import model_config_pb2 as mc

from conftest import CONFORMANCE, decode_alone
from pe_rank.runtime.inprocess import stepper_for
from pe_rank.core.prompt import PromptBuilder
from pe_rank.core.ranker import WindowJob
from pe_rank.core.tokenization import load_prompt_tokenizer
from pe_rank.service.embedded_triton import TritonServer
from pe_rank_export.configs import read_config, write_config
from pe_rank_export.shm import plan_for_repository

pytestmark = pytest.mark.triton

SOURCE = Path(__file__).resolve().parents[1] / "model_repository"
NAME = "tiny-a"

PROBE = '''
import asyncio, json
import numpy as np
import triton_python_backend_utils as pb_utils
from pe_rank.core.ranker import WindowJob
from pe_rank.triton_backend.bls import BlsEncoder, BlsWindowBackend


class Recording:
    """pb_utils as bls.py sees it: the real module, except that building an InferenceRequest or a
    PreferredMemory is recorded before the real one is built and returned."""

    def __init__(self):
        self.requests, self.memories = [], {}

    def __getattr__(self, name):
        return getattr(pb_utils, name)

    def PreferredMemory(self, *args, **kwargs):
        memory = pb_utils.PreferredMemory(*args, **kwargs)
        kind, device = (list(args) + [kwargs.get("preferred_device_id", 0)])[:2]
        self.memories[id(memory)] = {"type": "CPU" if kind == pb_utils.TRITONSERVER_MEMORY_CPU else
                                     "GPU" if kind == pb_utils.TRITONSERVER_MEMORY_GPU else str(kind), "device": device}
        return memory

    def InferenceRequest(self, *args, **kwargs):
        memory = kwargs.get("preferred_memory")
        self.requests.append({"model": kwargs.get("model_name"),
                              "preferred_memory": None if memory is None else self.memories.get(id(memory), "unknown")})
        return pb_utils.InferenceRequest(*args, **kwargs)


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            texts = [t.decode() for t in pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)]
            prompt_ids = pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS").as_numpy()
            recording = Recording()

            async def run():
                embeds, _ = await BlsEncoder(recording, lambda: False).embed(texts)
                outcome = await BlsWindowBackend(recording).rank_window(WindowJob(prompt_ids, embeds))
                return embeds, outcome

            loop = asyncio.new_event_loop()
            try:
                embeds, outcome = loop.run_until_complete(run())
            finally:
                loop.close()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("RECORD", np.array([json.dumps(recording.requests).encode()], dtype=np.object_)),
                pb_utils.Tensor("PROJECTED", np.asarray(embeds, dtype=np.float32)),
                pb_utils.Tensor("ORDER", np.asarray(outcome.order, dtype=np.int64))]))
        return responses
'''


def _probe_config() -> mc.ModelConfig:
    config = mc.ModelConfig(name="bls_probe", backend="python")
    config.input.add(name="TEXT", data_type=mc.TYPE_STRING, dims=[-1])
    config.input.add(name="PROMPT_IDS", data_type=mc.TYPE_INT64, dims=[-1])
    config.output.add(name="RECORD", data_type=mc.TYPE_STRING, dims=[1])
    config.output.add(name="PROJECTED", data_type=mc.TYPE_FP32, dims=[-1, -1])
    config.output.add(name="ORDER", data_type=mc.TYPE_INT64, dims=[-1])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    return config


def _input(config: mc.ModelConfig, name: str):
    return next(i for i in config.input if i.name == name)


# (copy's name, model it copies, change to its config, what the one-line reason must say)
BROKEN = [
    ("bad_tokenizer_decoupled", "pe_tokenizer", lambda c: setattr(c.model_transaction_policy, "decoupled", True),
     "model_transaction_policy decoupled is true; this model sends exactly one response per request"),
    ("bad_llm_dtype", "pe_llm", lambda c: setattr(_input(c, "PASSAGE_EMBEDS"), "data_type", mc.TYPE_FP16),
     "input PASSAGE_EMBEDS is TYPE_FP16, expected TYPE_FP32"),
    ("bad_llm_gpu_inputs", "pe_llm",
     lambda c: setattr(c.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"], "string_value", "no"),
     "parameter FORCE_CPU_ONLY_INPUT_TENSORS is 'no'; this model reads its inputs as NumPy arrays"),
    ("bad_llm_step_batching", "pe_llm", lambda c: setattr(c.parameters["step_batching"], "string_value", "sometimes"),
     "parameter step_batching: 'sometimes' is not one of on, off"),
    ("bad_llm_batching", "pe_llm", lambda c: setattr(c, "max_batch_size", 8),
     "max_batch_size is 8; this model takes one unbatched request at a time"),
    ("bad_rank_renamed", "pe_rank", lambda c: setattr(_input(c, "QUERY"), "name", "QUESTION"),
     "input QUERY is missing"),
    ("bad_rank_optional", "pe_rank", lambda c: setattr(_input(c, "PASSAGES"), "optional", True),
     "input PASSAGES is marked optional, but this model needs it in every request"),
    ("bad_encoder_runtime", "pe_encoder", lambda c: setattr(c.parameters["runtime"], "string_value", "tensorflow"),
     "parameter runtime: 'tensorflow' is not one of torch, onnxruntime"),
    ("bad_projector_rank", "pe_projector", lambda c: _input(c, "ENCODER_EMBEDDING").dims.append(-1),
     "input ENCODER_EMBEDDING has 3 dims (batch dim included), expected 2"),
]


@pytest.fixture(scope="module")
def triton(exported, tmp_path_factory):
    """tiny-a's torch repository plus the probe and broken copies; failed loads keep Triton up."""
    repository = tmp_path_factory.mktemp("ngc-triton") / "repository"
    shutil.copytree(exported(NAME, "torch"), repository)
    (repository / "bls_probe" / "1").mkdir(parents=True)
    (repository / "bls_probe" / "1" / "model.py").write_text(PROBE)
    write_config(repository / "bls_probe", _probe_config())
    for name, source, change, _ in BROKEN:
        (repository / name / "1").mkdir(parents=True)
        shutil.copyfile(SOURCE / source / "1" / "model.py", repository / name / "1" / "model.py")
        config = read_config(repository / source / "config.pbtxt")
        config.name = name
        change(config)
        write_config(repository / name, config)
    server = TritonServer(repository, extra_args=["--exit-on-error=false", "--strict-readiness=false"]).start()
    yield server
    server.stop()


def repository_index(server: TritonServer) -> dict[str, dict]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=30) as page:
        return {m["name"]: m for m in json.load(page)}


def test_a_python_model_refuses_a_config_it_cannot_serve_with_one_line(triton):
    index = repository_index(triton)
    for model in ("pe_tokenizer", "pe_encoder", "pe_projector", "pe_embed", "pe_llm", "pe_rank", "bls_probe"):
        assert index[model].get("state") == "READY", (model, index[model])  # the real configs pass the checks
    for name, _, _, reason in BROKEN:
        assert index[name].get("state") == "UNAVAILABLE", (name, index[name])
        first = index[name]["reason"].splitlines()[0]  # Triton appends the Python traceback below it
        assert first == f"Internal: ModelConfigError: model '{name}' config: {reason}" or \
            first.startswith(f"Internal: ModelConfigError: model '{name}' config: {reason}"), (name, first)


def test_bls_requests_ask_for_cpu_outputs_and_rank_as_before(triton, conformance_models, dl19):
    model, _ = conformance_models[NAME]
    query = dl19[2]
    texts = [h["content"] for h in query["hits"][:9]]
    prompt_ids, _ = PromptBuilder(load_prompt_tokenizer(CONFORMANCE / NAME)).build(query["query"], len(texts))
    client = tclient.InferenceServerClient(triton.grpc_url)
    try:
        inputs = [tclient.InferInput("TEXT", [len(texts)], "BYTES"), tclient.InferInput("PROMPT_IDS", [len(prompt_ids)], "INT64")]
        inputs[0].set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.asarray(prompt_ids, dtype=np.int64))
        result = client.infer("bls_probe", inputs, client_timeout=120)
    finally:
        client.close()
    record = json.loads(result.as_numpy("RECORD")[0])
    assert [r["model"] for r in record] == ["pe_embed", "pe_llm"]
    for call in record:
        assert call["preferred_memory"] == {"type": "CPU", "device": 0}, call
    projected = result.as_numpy("PROJECTED")
    want = model.project(model.encode(texts))
    np.testing.assert_allclose(projected, want, rtol=0, atol=1e-6)
    job = WindowJob(np.asarray(prompt_ids), projected)
    assert result.as_numpy("ORDER").tolist() == decode_alone(stepper_for(model), job)[0]


def test_the_launcher_sizes_python_backend_shm_from_the_window(triton):
    shm = plan_for_repository(triton.repository)
    hidden = json.loads((triton.repository / "pe_projector" / "1" / "projector.json").read_text())["hidden_size"]
    assert shm.window_bytes == 100 * hidden * 4
    args = Path(f"/proc/{triton.process.pid}/cmdline").read_bytes().decode().split("\0")
    assert f"--backend-config=python,shm-default-byte-size={shm.default_byte_size}" in args
    assert f"--backend-config=python,shm-growth-byte-size={shm.growth_byte_size}" in args
