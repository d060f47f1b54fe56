"""The ranking loop inside Triton: pe_embed and pe_llm called through BLS, one window at a time.

Used by the ``pe_rank`` model. The sliding-window pass is pe_rank.core.ranker's and the window
embeddings pe_rank.core.embeddings', the same the gRPC server and the in-process ranker run; only
the calls below differ.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..core.errors import WindowCancelled
from ..core.ranker import WindowJob, WindowOutcome, window_arrays


class BlsError(RuntimeError):
    """A model called through BLS answered with an error."""


def request(pb_utils: Any, model: str, inputs: list, outputs: list[str]) -> Any:
    """A BLS request whose outputs come back in CPU memory.

    On a GPU, pe_embed's outputs come from pe_projector on ONNX Runtime (KIND_GPU) or TensorRT,
    which leave them in GPU memory, and a BLS request with the default ``preferred_memory`` takes
    them there: ``as_numpy()`` then raises "Tensor is stored in GPU and cannot be converted to
    NumPy" (python_backend pb_tensor.cc). Asking for CPU makes the BLS response allocator put them
    in CPU shared memory (python_backend request_executor.cc ``ResponseAlloc``). CPU, not DLPack on
    the device: the consumer of these arrays is pe_llm, whose inputs the Python backend moves to
    the CPU anyway (FORCE_CPU_ONLY_INPUT_TENSORS, which its config check keeps on), and the
    ranker's bookkeeping reads them on the host.
    """
    return pb_utils.InferenceRequest(
        model_name=model, inputs=inputs, requested_output_names=outputs,
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))


async def _call(pb_utils: Any, model: str, inputs: list, outputs: list[str]) -> Any:
    response = await request(pb_utils, model, inputs, outputs).async_exec()
    if response.has_error():
        raise BlsError(f"{model}: {response.error().message()}")
    return response


class BlsEncoder:
    """:class:`~pe_rank.core.embeddings.Encoder` through pe_embed and pe_projector, called by BLS."""

    def __init__(self, pb_utils: Any, is_cancelled: Callable[[], bool]) -> None:
        self.pb_utils, self.is_cancelled = pb_utils, is_cancelled

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self.is_cancelled():  # the caller left: the remaining windows are never sent
            raise WindowCancelled("request cancelled")
        array = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
        response = await _call(self.pb_utils, "pe_embed", [self.pb_utils.Tensor("TEXT", array)],
                               ["PROJECTED", "ENCODER_EMBEDDING"])
        return _output(self.pb_utils, response, "PROJECTED"), _output(self.pb_utils, response, "ENCODER_EMBEDDING")

    async def project(self, vectors: np.ndarray) -> np.ndarray:
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        response = await _call(self.pb_utils, "pe_projector", [self.pb_utils.Tensor("ENCODER_EMBEDDING", array)],
                               ["PROJECTED"])
        return _output(self.pb_utils, response, "PROJECTED")


def _output(pb_utils: Any, response: Any, name: str) -> np.ndarray:
    return pb_utils.get_output_tensor_by_name(response, name).as_numpy()


class BlsWindowBackend:
    """One pe_llm request per window."""

    def __init__(self, pb_utils: Any) -> None:
        self.pb_utils = pb_utils

    async def rank_window(self, job: WindowJob) -> WindowOutcome:
        inputs = [self.pb_utils.Tensor(name, array) for name, array in window_arrays(job).items()]
        response = await _call(self.pb_utils, "pe_llm", inputs, ["ORDER", "DECODE_STEPS", "CACHED_TOKENS"])

        def scalar(name: str) -> int:
            return int(self.pb_utils.get_output_tensor_by_name(response, name).as_numpy().reshape(-1)[0])

        order = self.pb_utils.get_output_tensor_by_name(response, "ORDER").as_numpy()
        return WindowOutcome(order=[int(i) for i in order], prompt_tokens=len(job.prompt_ids),
                             cached_tokens=scalar("CACHED_TOKENS"), decode_steps=scalar("DECODE_STEPS"))
