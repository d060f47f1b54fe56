"""pe_llm: the LLM decode steps of PE-Rank, one Triton sequence per window.

START carries PROMPT_IDS [T] and the window's PASSAGE_EMBEDS [n, H] and returns SCORES [n]
at the last prompt position; each later request carries CHOICE (the emitted passage's
index), feeds its embedding through the KV cache and returns the next SCORES; END frees
the state. Every tensor has a leading batch dim of 1 per request (max_batch_size > 0).

The sequence batcher (``oldest``) hands execute() requests of up to max_batch_size different
sequences at once. Their CHOICE steps run as ONE forward pass (TorchStepper.step_many): a
decode step reads every weight for a single token, so a batch of steps costs little more
than one. STARTs (prefills of different lengths) run one by one. Every response reports
LIVE_SEQUENCES, STEP_BATCH (how many steps shared this request's forward; 0 for a START) and
CACHED_TOKENS (prompt tokens a START took from the head cache instead of prefilling; else 0).
A request that fails (bad CHOICE, unknown sequence, bad prompt) gets its own error response;
the others in the batch go on. The step code is pe_rank's TorchStepper, the same the
in-process ranker runs.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pe_rank.triton.backend_utils import device_of, input_array, model_dir, parameters


def _request_row(array, name):
    """The request's one window: its tensors carry a batch dim of exactly 1."""
    if array.ndim == 0 or array.shape[0] != 1:
        raise ValueError(f"{name}: one window per request (batch dim 1), got shape {list(array.shape)}")
    return array[0]


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from pe_rank.core.checkpoint import WeightFiles, read_checkpoint_info
        from pe_rank.core.model import load_llm, torch_dtype
        from pe_rank.core.prompt import PromptBuilder
        from pe_rank.core.steps import TorchStepper
        from pe_rank.core.tokenization import load_prompt_tokenizer
        from pe_rank.triton.sequences import SequenceStore

        folder = model_dir(args)
        meta = json.loads((folder / "pe_llm.json").read_text())
        info = read_checkpoint_info(folder / "checkpoint")
        dtype = torch_dtype(meta["dtype"])
        device = torch.device(device_of(args))
        llm = load_llm(info, WeightFiles(info.folder), dtype).to(device)
        prompts = PromptBuilder(load_prompt_tokenizer(info.folder))
        self.stepper = TorchStepper(llm, prompts, dtype, device, head_cache=int(parameters(args).get("head_cache", 16)))
        config = json.loads(args["model_config"])
        idle_us = int(config.get("sequence_batching", {}).get("max_sequence_idle_microseconds", 60_000_000))
        self.states = SequenceStore(idle_timeout_s=idle_us / 1e6)

    def execute(self, requests):
        self.states.expire_idle()
        results = [None] * len(requests)  # per request: (scores, step batch, cached tokens) or its exception
        steps = []  # (request position, state, passage index): the CHOICE steps to batch
        ends = []
        for k, request in enumerate(requests):
            try:
                corrid = int(input_array(pb_utils, request, "CORRID").reshape(-1)[0])
                start = bool(input_array(pb_utils, request, "START").reshape(-1)[0])
                if bool(input_array(pb_utils, request, "END").reshape(-1)[0]):
                    ends.append(corrid)  # freed after the batch, whether this request succeeds or not
                choice = input_array(pb_utils, request, "CHOICE", required=False)
                if start or choice is None:
                    results[k] = self._start(request, corrid, start, choice)
                else:
                    state = self.states.get(corrid)
                    index = int(_request_row(choice, "CHOICE").reshape(-1)[0])
                    self.stepper.check_index(state, index)
                    steps.append((k, state, index))
            except Exception as exc:  # this request's error only; the others go on
                results[k] = exc
        self._run_steps(steps, results)
        for corrid in ends:
            self.states.drop(corrid)
        live = np.array([[len(self.states)]], dtype=np.int64)
        return [self._response(result, live) for result in results]

    def _start(self, request, corrid, start, choice):
        if start and pb_utils.get_input_tensor_by_name(request, "PROMPT_IDS") is None and choice is None:
            return np.zeros(0, dtype=np.float32), 0, 0  # a bare START(+END): reports LIVE_SEQUENCES only
        if not start:
            return np.zeros(0, dtype=np.float32), 0, 0  # e.g. a bare END
        self.states.drop(corrid)
        ids = _request_row(input_array(pb_utils, request, "PROMPT_IDS"), "PROMPT_IDS")
        embeds = _request_row(input_array(pb_utils, request, "PASSAGE_EMBEDS"), "PASSAGE_EMBEDS")
        state, scores = self.stepper.start(ids, embeds)
        self.states.put(corrid, state)
        return scores, 0, state.cached_tokens

    def _run_steps(self, steps, results):
        """All valid CHOICE steps of this batch in one forward; should that fail, each on its own."""
        if not steps:
            return
        try:
            rows = self.stepper.step_many([state for _, state, _ in steps], [index for _, _, index in steps])
        except Exception:  # step_many leaves every state untouched when it raises
            rows = None
        if rows is not None:
            for (k, _, _), row in zip(steps, rows):
                results[k] = (row, len(steps), 0)
            return
        for k, state, index in steps:
            try:
                results[k] = (self.stepper.step(state, index), 1, 0)
            except Exception as exc:
                results[k] = exc

    @staticmethod
    def _response(result, live):
        if isinstance(result, Exception):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(result).__name__}: {result}"))
        scores, batch, cached = result
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("SCORES", np.asarray(scores, dtype=np.float32)[None]),
            pb_utils.Tensor("LIVE_SEQUENCES", live),
            pb_utils.Tensor("STEP_BATCH", np.array([[batch]], dtype=np.int64)),
            pb_utils.Tensor("CACHED_TOKENS", np.array([[cached]], dtype=np.int64)),
        ])

    def finalize(self):
        self.states.close()
