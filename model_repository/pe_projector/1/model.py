"""pe_projector: encoder embeddings [N, E] -> LLM input space [N, H].

Serves pe_embed, and callers who bring encoder embeddings from their first-stage dense
index. ``runtime``: ``onnxruntime`` (model.onnx) or ``torch`` (projector.safetensors).
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pe_rank.core.errors import InvalidRequest
from pe_rank.triton_backend.config_check import check_config, integer, one_of
from pe_rank.triton_backend.utils import (cpu_threads, device_of, input_array, model_dir, onnx_session, parameters,
                                          respond_each)


class TritonPythonModel:
    def initialize(self, args):
        check_config(args, "pe_projector", batching=True,
                     parameters={"runtime": one_of("torch", "onnxruntime", default="onnxruntime"),
                                 "threads": integer(0)})
        folder = model_dir(args)
        self.runtime = parameters(args).get("runtime", "onnxruntime")
        threads = cpu_threads(args) if self.runtime == "torch" else int(parameters(args).get("threads", "0") or 0)
        meta = json.loads((folder / "projector.json").read_text())
        self.embedding_size = int(meta["embedding_size"])
        if self.runtime == "torch":
            import torch
            from safetensors.torch import load_file

            from pe_rank.runtime.weights import build_projector
            from pe_rank.runtime.model import torch_dtype

            self.dtype = torch_dtype(meta["dtype"])
            self.device = torch.device(device_of(args))
            self.projector = build_projector(meta["projector_type"], self.embedding_size, int(meta["hidden_size"]))
            self.projector.load_state_dict(load_file(str(folder / "projector.safetensors")))
            self.projector = self.projector.to(self.device, self.dtype).eval()
        else:
            self.session = onnx_session(folder / "model.onnx", args, threads)

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._project)

    def _project(self, request):
        x = input_array(pb_utils, request, "ENCODER_EMBEDDING").astype(np.float32)
        if x.ndim != 2 or x.shape[1] != self.embedding_size:
            raise InvalidRequest("ENCODER_EMBEDDING", f"must be [N, {self.embedding_size}], got {list(x.shape)}")
        if not np.all(np.isfinite(x)):
            raise InvalidRequest("ENCODER_EMBEDDING", "contains NaN or Inf")
        if self.runtime == "torch":
            from pe_rank.runtime.model import project

            out = project(self.projector, x, self.dtype, self.device)
        else:
            out = self.session.run(["PROJECTED"], {"ENCODER_EMBEDDING": x})[0]
        return [pb_utils.Tensor("PROJECTED", out.astype(np.float32))]

    def finalize(self):
        self.projector = self.session = None
