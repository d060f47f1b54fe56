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
from pe_rank.triton_backend.config_check import check_config, integer, one_of
from pe_rank.triton_backend.utils import (cpu_threads, device_of, input_array, model_dir, onnx_session, parameters,
                                          respond_each)


class TritonPythonModel:
    def initialize(self, args):
        check_config(args, "pe_encoder", batching=True,
                     parameters={"runtime": one_of("torch", "onnxruntime", default="onnxruntime"),
                                 "threads": integer(0)})
        folder = model_dir(args)
        self.runtime = parameters(args).get("runtime", "onnxruntime")
        threads = cpu_threads(args) if self.runtime == "torch" else int(parameters(args).get("threads", "0") or 0)
        if self.runtime == "torch":
            import torch
            from transformers import AutoModel

            meta = json.loads((folder / "encoder" / "pe_rank.json").read_text())
            self.pooling = meta["pooling"]
            self.device = torch.device(device_of(args))
            self.encoder = AutoModel.from_pretrained(str(folder / "encoder")).eval().to(self.device)
        else:
            self.session = onnx_session(folder / "model.onnx", args, threads)
        self._warm_up()

    def _warm_up(self):
        """Encode throwaway batches of the usual shapes, so the first burst after a start costs what later ones do."""
        for batch, length in ((1, 16), (20, 128), (20, 512), (64, 256)):
            ids = np.full((batch, length), 1, dtype=np.int64)
            self._run(ids, np.ones_like(ids))

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._encode)

    def _encode(self, request):
        ids = input_array(pb_utils, request, "INPUT_IDS").astype(np.int64)
        mask = input_array(pb_utils, request, "ATTENTION_MASK").astype(np.int64)
        if ids.shape != mask.shape or ids.ndim != 2:
            raise InvalidRequest("INPUT_IDS", f"{list(ids.shape)} and ATTENTION_MASK {list(mask.shape)} must be equal [N, L]")
        return [pb_utils.Tensor("EMBEDDING", self._run(ids, mask).astype(np.float32))]

    def _run(self, ids, mask):
        if self.runtime == "torch":
            from pe_rank.runtime.model import encode_in_batches

            return encode_in_batches(self.encoder, self.pooling, ids, mask, self.device)
        return self.session.run(["EMBEDDING"], {"INPUT_IDS": ids, "ATTENTION_MASK": mask})[0]

    def finalize(self):
        self.encoder = self.session = None
