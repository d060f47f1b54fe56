"""pe_llm: the LLM decode steps of PE-Rank, one Triton sequence per window.

START carries PROMPT_IDS [T] and the window's PASSAGE_EMBEDS [n, H] and returns SCORES [n]
at the last prompt position; each later request carries CHOICE (the emitted passage's
index), feeds its embedding through the KV cache and returns the next SCORES; END frees
the state. Every response also reports LIVE_SEQUENCES. The step code is pe_rank's
TorchStepper, the same the in-process ranker runs.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pe_rank.triton.backend_utils import device_of, input_array, model_dir, respond_each


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from pe_rank.core.checkpoint import WeightFiles, read_checkpoint_info
        from pe_rank.core.model import load_llm, torch_dtype
        from pe_rank.core.prompt import PLACEHOLDER
        from pe_rank.core.steps import TorchStepper
        from pe_rank.core.tokenization import load_prompt_tokenizer
        from pe_rank.triton.sequences import SequenceStore

        folder = model_dir(args)
        meta = json.loads((folder / "pe_llm.json").read_text())
        info = read_checkpoint_info(folder / "checkpoint")
        dtype = torch_dtype(meta["dtype"])
        device = torch.device(device_of(args))
        llm = load_llm(info, WeightFiles(info.folder), dtype).to(device)
        placeholder_id = load_prompt_tokenizer(info.folder).token_id(PLACEHOLDER)
        self.stepper = TorchStepper(llm, placeholder_id, dtype, device)
        config = json.loads(args["model_config"])
        idle_us = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds", 60_000_000))
        self.states = SequenceStore(idle_timeout_s=idle_us / 1e6)

    def execute(self, requests):
        self.states.expire_idle()
        return respond_each(pb_utils, requests, self._one)

    def _one(self, request):
        corrid = int(input_array(pb_utils, request, "CORRID").reshape(-1)[0])
        start = bool(input_array(pb_utils, request, "START").reshape(-1)[0])
        end = bool(input_array(pb_utils, request, "END").reshape(-1)[0])
        try:
            scores = self._advance(request, corrid, start)
        finally:
            if end:
                self.states.drop(corrid)
        return [pb_utils.Tensor("SCORES", scores.astype(np.float32)),
                pb_utils.Tensor("LIVE_SEQUENCES", np.array([len(self.states)], dtype=np.int64))]

    def _advance(self, request, corrid, start):
        choice = input_array(pb_utils, request, "CHOICE", required=False)
        if start and pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS") is None and choice is None:
            return np.zeros(0, dtype=np.float32)  # a bare START(+END): reports LIVE_SEQUENCES only
        if start:
            self.states.drop(corrid)
            ids = input_array(pb_utils, request, "PROMPT_IDS").reshape(-1)
            embeds = input_array(pb_utils, request, "PASSAGE_EMBEDS")
            state, scores = self.stepper.start(ids, embeds)
            self.states.put(corrid, state)
            return scores
        if choice is None:
            return np.zeros(0, dtype=np.float32)  # e.g. a bare END
        state = self.states.get(corrid)
        return self.stepper.step(state, int(choice.reshape(-1)[0]))

    def finalize(self):
        self.states.close()
