"""pe_llm: one whole PE-Rank window per request, decoded by an in-flight batching engine.

A request carries PROMPT_IDS [T], the window's PASSAGE_EMBEDS [n, H], optionally EMIT (how
many passages decoding must emit; the rest is ordered by the last scores) and MODE (full or
first). The response carries ORDER [n] (the window's local permutation, best first) and its
costs: DECODE_STEPS, CACHED_TOKENS (prompt tokens from the head cache), PREFILL_MS, DECODE_MS.

execute() hands each request to the engine (pe_rank.runtime.engine.DecodeEngine) and returns at
once; the engine thread prefills new windows as they arrive, advances every live window by
one decode step in ONE batched forward, and answers each window through its response sender
the moment it is decided. Nothing outlives a request: a cancelled request (client gone or
deadline passed) is dropped before its next step, its KV cache freed. Live windows, step batch
sizes, decode steps and cached prompt tokens are Triton custom metrics on Triton's /metrics.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pe_rank.core.errors import InvalidRequest
from pe_rank.triton_backend.config_check import check_config, integer, number, one_of, require_response_sender
from pe_rank.triton_backend.hold import PARAMETER, WindowHold
from pe_rank.triton_backend.utils import cpu_threads, device_of, input_array, model_dir, parameters, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        require_response_sender(pb_utils, args["model_name"])
        check_config(args, "pe_llm", parameters={
            "head_cache": integer(0), "max_live_windows": integer(1), "max_window_tokens": integer(1),
            "max_window_passages": integer(1), "prefill_budget": integer(1), "torch_threads": integer(0),
            "step_batching": one_of("on", "off", default="on"), "cuda_graphs": one_of("on", "off", default="off"),
            "tie_margin": number(0), PARAMETER: integer(0)})
        import torch

        from pe_rank.core.checkpoint import read_checkpoint_info
        from pe_rank.runtime.weights import WeightFiles
        from pe_rank.runtime.engine import DecodeEngine, EngineLimits, warm_up
        from pe_rank.runtime.model import load_llm, torch_dtype
        from pe_rank.core.prompt import PromptBuilder
        from pe_rank.runtime.steps import TorchStepper
        from pe_rank.core.tokenization import load_prompt_tokenizer
        from pe_rank.triton_backend.engine_metrics import TritonEngineMetrics

        folder = model_dir(args)
        meta = json.loads((folder / "pe_llm.json").read_text())
        info = read_checkpoint_info(folder / "checkpoint")
        dtype = torch_dtype(meta["dtype"])
        device = torch.device(device_of(args))
        params = parameters(args)
        cpu_threads(args, "torch_threads")
        llm = load_llm(info, WeightFiles(info.folder), dtype).to(device)
        prompts = PromptBuilder(load_prompt_tokenizer(info.folder))
        stepper = TorchStepper(llm, prompts, dtype, device, head_cache=int(params.get("head_cache", 16)))
        self.metrics = TritonEngineMetrics(pb_utils, args["model_name"])
        limits = EngineLimits(max_live=int(params.get("max_live_windows", 16)),
                              max_tokens=int(params.get("max_window_tokens", 1024)),
                              max_passages=int(params.get("max_window_passages", 100)),
                              prefill_budget=int(params.get("prefill_budget", 512)))
        self.engine = DecodeEngine(stepper, observer=self.metrics, limits=limits,
                                   batch_steps=params.get("step_batching", "on") != "off",
                                   graphs=params.get("cuda_graphs", "off") == "on",
                                   tie_margin=float(params["tie_margin"]) if "tie_margin" in params else None)
        self.metrics.on_warm_up(warm_up(self.engine, prompts))  # before Triton reports the model ready
        self.model_name = args["model_name"]
        # test-only (never exported): hold windows until N arrive, so tests see them decoded together
        self.submit = WindowHold(self.engine.submit, int(params.get(PARAMETER, 0)), together=self.engine.submitting)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = self._job(request)
                self.submit(job, lambda result, sender=sender: sender.send(_response(result), flags=FINAL),
                            sender.is_cancelled)
            except Exception as exc:  # this request's error only (a dead engine: UNAVAILABLE, retried elsewhere)
                sender.send(_error(exc), flags=FINAL)
        if not self.engine.healthy:
            self._unload()
        return None  # every response goes through its sender, from the engine's reply thread

    def _unload(self):
        """A dead engine: ask Triton to unload the model (explicit model control only), as vLLM's backend does."""
        if getattr(self, "_unloading", False):
            return
        self._unloading = True
        try:
            pb_utils.unload_model(self.model_name)
        except Exception as exc:  # model control mode none: the model stays loaded and answers UNAVAILABLE
            pb_utils.Logger.log_warn(f"pe_llm: the decode engine failed and the model cannot unload itself ({exc})")

    @staticmethod
    def _job(request):
        from pe_rank.core.ranker import WindowJob
        from pe_rank.core.types import Mode

        emit = input_array(pb_utils, request, "EMIT", required=False)
        mode = input_array(pb_utils, request, "MODE", required=False)
        mode_name = "full" if mode is None else _text(mode.reshape(-1)[0])
        if mode_name not in ("full", "first"):
            raise InvalidRequest("MODE", f"must be full or first, got {mode_name!r}")
        embeds = input_array(pb_utils, request, "PASSAGE_EMBEDS")
        if embeds.ndim != 2 or len(embeds) == 0:
            raise InvalidRequest("PASSAGE_EMBEDS", f"expected [n >= 1, H], got {list(embeds.shape)}")
        return WindowJob(prompt_ids=input_array(pb_utils, request, "PROMPT_IDS"), embeds=embeds, mode=Mode(mode_name),
                         emit=0 if emit is None else int(emit.reshape(-1)[0]))

    def finalize(self):
        self.submit.release()
        self.engine.close()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _error(exc):
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))


def _response(result):
    if isinstance(result, BaseException):
        return _error(result)
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("ORDER", np.asarray(result.order, dtype=np.int64)),
        pb_utils.Tensor("DECODE_STEPS", np.array([result.decode_steps], dtype=np.int64)),
        pb_utils.Tensor("CACHED_TOKENS", np.array([result.cached_tokens], dtype=np.int64)),
        pb_utils.Tensor("PREFILL_MS", np.array([result.prefill_ms], dtype=np.float32)),
        pb_utils.Tensor("DECODE_MS", np.array([result.decode_ms], dtype=np.float32)),
    ])
