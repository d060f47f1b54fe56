"""pe_encoder: input ids [N, L] -> pooled, L2-normalised embeddings [N, E].

``runtime`` (config parameter): ``onnxruntime`` runs the exported model.onnx; ``torch`` runs
the PyTorch encoder from ``encoder/`` with the reference's exact numerics (batches of 16).
Each request is encoded on its own, so its padding (and so its float bits) never depends
on what else was in flight.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pe_rank.core.errors import InvalidRequest
from pe_rank.triton_backend.config_check import check_config, one_of
from pe_rank.triton_backend.utils import device_of, input_array, model_dir, onnx_session, parameters, respond_each


class TritonPythonModel:
    def initialize(self, args):
        check_config(args, "pe_encoder", batching=True,
                     parameters={"runtime": one_of("torch", "onnxruntime", default="onnxruntime")})
        folder = model_dir(args)
        self.runtime = parameters(args).get("runtime", "onnxruntime")
        if self.runtime == "torch":
            import torch
            from transformers import AutoModel

            meta = json.loads((folder / "encoder" / "pe_rank.json").read_text())
            self.pooling = meta["pooling"]
            self.device = torch.device(device_of(args))
            self.encoder = AutoModel.from_pretrained(str(folder / "encoder")).eval().to(self.device)
        else:
            self.session = onnx_session(folder / "model.onnx", args)

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._encode)

    def _encode(self, request):
        ids = input_array(pb_utils, request, "INPUT_IDS").astype(np.int64)
        mask = input_array(pb_utils, request, "ATTENTION_MASK").astype(np.int64)
        if ids.shape != mask.shape or ids.ndim != 2:
            raise InvalidRequest("INPUT_IDS", f"{list(ids.shape)} and ATTENTION_MASK {list(mask.shape)} must be equal [N, L]")
        if self.runtime == "torch":
            from pe_rank.runtime.model import encode_in_batches

            out = encode_in_batches(self.encoder, self.pooling, ids, mask, self.device)
        else:
            out = self.session.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]
        return [pb_utils.Tensor("EMBEDDING", out.astype(np.float32))]

    def finalize(self):
        self.encoder = self.session = None
