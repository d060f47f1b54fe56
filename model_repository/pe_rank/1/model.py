"""pe_rank: a whole PE-Rank request as one Triton call (for Triton-only deployments and perf_analyzer).

Inputs QUERY (1 text), PASSAGES (n texts), optional WINDOW_SIZE, STRIDE, TOP_N (INT32), MODE
(full or first), PRERANK (BOOL: order by the encoder's cosine first) and DEPTH (INT32: PE-Rank
reorders only the top DEPTH; 0 all); PRERANK and DEPTH default to the model's (ranking.json);
output ORDER (INT64, input indices best first; the top TOP_N when it is > 0).
The ranking is pe_rank.core.reranker's, as in the server; each window is one pe_embed and one pe_llm
call through BLS. execute() only hands requests to an asyncio loop of this model and returns,
so concurrent requests run side by side (their windows meet in pe_llm's batched steps), and
each answers through its response sender when done. A cancelled request sends no further window.
"""
import asyncio
import concurrent.futures
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from pe_rank.core.errors import EngineUnavailable
from pe_rank.triton_backend.config_check import check_config, require_response_sender
from pe_rank.triton_backend.utils import input_array, model_dir, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DRAIN_S = 30.0  # finalize waits this long for running requests before cancelling them


def _error(exc):
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))


class TritonPythonModel:
    def initialize(self, args):
        require_response_sender(pb_utils, args["model_name"])
        check_config(args, "pe_rank")
        from pe_rank.core.checkpoint import read_checkpoint_info
        from pe_rank.core.prompt import PromptBuilder
        from pe_rank.core.tokenization import load_prompt_tokenizer

        checkpoint = model_dir(args).parents[1] / "pe_llm" / "1" / "checkpoint"
        self.info = read_checkpoint_info(checkpoint)
        self.prompts = PromptBuilder(load_prompt_tokenizer(checkpoint))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pe-rank-requests", daemon=True)
        self.thread.start()
        self.running: set = set()  # requests being ranked (concurrent futures on the loop)
        self.lock = threading.Lock()  # execute() adds from Triton's thread, done callbacks discard on the loop's
        self.closing = False

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            with self.lock:  # checked and added together: finalize waits for every request it let in
                future = None if self.closing else asyncio.run_coroutine_threadsafe(self._answer(request, sender),
                                                                                    self.loop)
                if future is not None:
                    self.running.add(future)
            if future is None:  # unloading: another instance or Triton may take it
                sender.send(_error(EngineUnavailable("pe_rank is unloading")), flags=FINAL)
            else:
                future.add_done_callback(self._done)
        return None

    def _done(self, future):
        with self.lock:
            self.running.discard(future)

    async def _answer(self, request, sender):
        try:
            order = await self._rank(request, sender.is_cancelled)
            response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ORDER", np.asarray(order, np.int64))])
        except asyncio.CancelledError:  # finalize gave up waiting: answer, never leave the caller hanging
            sender.send(_error(EngineUnavailable("pe_rank unloaded before the request finished")), flags=FINAL)
            raise
        except Exception as exc:
            response = _error(exc)
        sender.send(response, flags=FINAL)

    async def _rank(self, request, is_cancelled):
        from pe_rank.core.embeddings import WindowEmbeddings
        from pe_rank.core.prerank import with_defaults
        from pe_rank.core.reranker import Reranker
        from pe_rank.core.validation import validate_request
        from pe_rank.triton_backend.bls import BlsEncoder, BlsWindowBackend

        req = with_defaults(_request(request), self.info.defaults)
        validate_request(req, self.info.embedding_size, prompts=self.prompts)
        reranker = Reranker(WindowEmbeddings(BlsEncoder(pb_utils, is_cancelled)), BlsWindowBackend(pb_utils),
                            self.prompts)
        return [r.index for r in (await reranker.rerank(req)).ranking]

    def finalize(self):
        """Drain: refuse new requests, let running ones finish (bounded), cancel the rest with an answer."""
        with self.lock:
            self.closing = True
            running = list(self.running)
        _, late = concurrent.futures.wait(running, timeout=DRAIN_S)
        for future in late:
            future.cancel()
        concurrent.futures.wait(late, timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _texts(request, name, required=True):
    array = input_array(pb_utils, request, name, required=required)
    if array is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]


def _int(request, name, default):
    array = input_array(pb_utils, request, name, required=False)
    return default if array is None else int(array.reshape(-1)[0])


def _request(request):
    """The Triton inputs as a RerankRequest (values are checked by validate_request)."""
    from pe_rank.core.types import Mode, Passage, RerankRequest
    from pe_rank.core.validation import InvalidRequest

    query = _texts(request, "QUERY")
    if len(query) != 1:
        raise InvalidRequest("QUERY", f"exactly one query text, got {len(query)}")
    mode = (_texts(request, "MODE", required=False) or ["full"])[0]
    if mode not in ("full", "first"):
        raise InvalidRequest("MODE", f"must be full or first, got {mode!r}")
    passages = tuple(Passage(id=str(i), text=t) for i, t in enumerate(_texts(request, "PASSAGES")))
    top_n = _int(request, "TOP_N", 0)
    prerank = input_array(pb_utils, request, "PRERANK", required=False)
    return RerankRequest(query=query[0], passages=passages, window_size=_int(request, "WINDOW_SIZE", 20),
                         stride=_int(request, "STRIDE", 10), mode=Mode(mode), top_n=None if top_n == 0 else top_n,
                         prerank=None if prerank is None else bool(prerank.reshape(-1)[0]),
                         depth=_int(request, "DEPTH", None))
